//! `<lora:name:multiplier>` tags in an A1111 prompt: found, removed from the text
//! the model sees, and matched to the LoRA folder's files by name (the file stem,
//! or the file name with `.safetensors`), as A1111's Lora extension reads them
//! (`<lora:name>` is multiplier 1).
//!
//! Must not: read files or know about HTTP; the caller lists the folder.

/// A tag's LoRA as the prompt names it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct LoraTag {
    /// As written in the tag.
    pub name: String,
    pub multiplier: f64,
}

/// A tag that cannot be used; the message says why.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub(super) struct TagError(pub String);

/// `prompt` without its `<lora:…>` tags (other `<kind:…>` tags stay, as text), and
/// the tags in order.
pub(super) fn split(prompt: &str) -> Result<(String, Vec<LoraTag>), TagError> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = vec![];
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        text.push_str(&rest[..start]);
        let body = &rest[start + "<lora:".len()..start + len];
        tags.push(parse_tag(body)?);
        rest = &rest[start + len + 1..];
    }
    text.push_str(rest);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    Ok((text, tags))
}

/// `name` or `name:multiplier`.
fn parse_tag(body: &str) -> Result<LoraTag, TagError> {
    let mut parts = body.split(':');
    let name = parts.next().unwrap_or_default().trim();
    if name.is_empty() {
        return Err(TagError(format!("`<lora:{body}>` names no LoRA")));
    }
    let multiplier = match parts.next() {
        None => 1.0,
        Some(m) => m
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|m| m.is_finite())
            .ok_or_else(|| {
                TagError(format!(
                    "`<lora:{body}>`: the multiplier `{m}` is not a number"
                ))
            })?,
    };
    if parts.next().is_some() {
        return Err(TagError(format!(
            "`<lora:{body}>`: separate text-encoder and transformer multipliers are not supported; write `<lora:{name}:multiplier>`"
        )));
    }
    Ok(LoraTag {
        name: name.to_string(),
        multiplier,
    })
}

/// The file of `files` (names in the LoRA folder) that `name` means: the same
/// stem, or the same file name.
pub(super) fn find<'a>(name: &str, files: &'a [String]) -> Option<&'a str> {
    files
        .iter()
        .find(|f| stem(f) == name || f.as_str() == name)
        .map(String::as_str)
}

/// A file name without its `.safetensors` extension.
pub(super) fn stem(file: &str) -> &str {
    file.strip_suffix(".safetensors").unwrap_or(file)
}

/// Up to `n` stems of `files` closest to `name` by edit distance, closest first.
pub(super) fn closest<'a>(name: &str, files: &'a [String], n: usize) -> Vec<&'a str> {
    let mut scored: Vec<(usize, &str)> = files
        .iter()
        .map(|f| (edit_distance(name, stem(f)), stem(f)))
        .collect();
    scored.sort();
    scored.into_iter().take(n).map(|(_, s)| s).collect()
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_removed_and_read_in_order() {
        let (text, tags) =
            split("a cat <lora:style:0.8>, on a mat <lora:detail> <hypernet:x:1>").unwrap();
        assert_eq!(text, "a cat , on a mat <hypernet:x:1>");
        assert_eq!(
            tags,
            [
                LoraTag {
                    name: "style".into(),
                    multiplier: 0.8
                },
                LoraTag {
                    name: "detail".into(),
                    multiplier: 1.0
                }
            ]
        );
        assert_eq!(split("no tags").unwrap(), ("no tags".into(), vec![]));
        assert!(split("<lora:a:x>").unwrap_err().0.contains("not a number"));
        assert!(split("<lora::1>").unwrap_err().0.contains("names no LoRA"));
        assert!(split("<lora:a:1:0.5>").is_err());
    }

    #[test]
    fn names_match_stems_or_file_names_and_misses_list_the_closest() {
        let files = vec![
            "dog.safetensors".to_string(),
            "my-style.safetensors".to_string(),
            "other.safetensors".to_string(),
        ];
        assert_eq!(find("my-style", &files), Some("my-style.safetensors"));
        assert_eq!(find("dog.safetensors", &files), Some("dog.safetensors"));
        assert_eq!(find("cat", &files), None);
        assert_eq!(closest("my_styel", &files, 1), ["my-style"]);
        assert_eq!(closest("x", &files, 5).len(), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
