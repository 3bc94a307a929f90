//! `multipart/form-data` bodies (RFC 7578 over RFC 2046's delimiters), as
//! ComfyUI's `POST /upload/image` receives them: the body, already read whole
//! under the server's size limit, split into its named parts.
//!
//! Owns: the boundary from the `Content-Type`, the delimiter scan, each part's
//! `Content-Disposition` (`name`, `filename`, RFC 5987 `filename*`) and
//! `Content-Type`, and limits on parts and header sizes. Any input gives a
//! result or a [`MultipartError`], never a panic.
//!
//! Must not: read from the network, decide what the fields mean (that is the
//! upload route's), or decode files.

/// At most this many parts per body (an upload has four fields).
const MAX_PARTS: usize = 32;
/// At most this many bytes in one part's header block, its blank line included.
const MAX_HEADER_BYTES: usize = 8 * 1024;
/// RFC 2046 §5.1.1: a boundary is 1 to 70 characters.
const MAX_BOUNDARY_LEN: usize = 70;

/// One field of a form: its name, and for a file its file name and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Vec<u8>,
}

/// Why a body is not a `multipart/form-data` form we accept. Parts are
/// counted from 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum MultipartError {
    #[error(
        "the Content-Type is `{0}`, not multipart/form-data: send the form as multipart/form-data"
    )]
    NotMultipart(String),
    #[error("the multipart/form-data Content-Type has no boundary (or an empty one): add `; boundary=...` naming the delimiter the body uses")]
    MissingBoundary,
    #[error("the multipart boundary is {0} characters long; RFC 2046 allows at most 70")]
    BoundaryTooLong(usize),
    #[error("the body has no `--` + boundary delimiter line: the boundary in the Content-Type must be the one the body uses")]
    NoDelimiter,
    #[error("the body ends before the closing `--` + boundary + `--` delimiter: the upload was cut short or its boundary is wrong")]
    MissingClosingDelimiter,
    #[error("the form has more than {MAX_PARTS} parts; send at most {MAX_PARTS} fields")]
    TooManyParts,
    #[error("the headers of part {0} are over 8 KiB")]
    HeadersTooLarge(usize),
    #[error("part {0} has a header line without a `:`")]
    MalformedHeader(usize),
    #[error("the headers of part {0} are not UTF-8")]
    NonUtf8Header(usize),
    #[error("part {0} has no Content-Disposition header: each part needs `Content-Disposition: form-data; name=\"...\"`")]
    MissingContentDisposition(usize),
    #[error("the Content-Disposition of part {0} has no name: add `; name=\"...\"`")]
    MissingName(usize),
    #[error("the filename* of part {0} is not `UTF-8''` (or `ISO-8859-1''`) followed by percent-encoded bytes of that charset")]
    InvalidExtendedFilename(usize),
}

/// Splits `body` into its parts, using the boundary of `content_type` (the
/// request's `Content-Type` header). Preamble and epilogue are ignored; part
/// data is returned byte for byte.
pub(crate) fn parse(content_type: &str, body: &[u8]) -> Result<Vec<Part>, MultipartError> {
    let boundary = boundary(content_type)?;
    // The delimiter between parts is CRLF "--" boundary; the first one may
    // also open the body, or follow a preamble line ended by a bare LF.
    let mut delimiter = Vec::with_capacity(boundary.len() + 4);
    delimiter.extend_from_slice(b"\r\n--");
    delimiter.extend_from_slice(boundary.as_bytes());
    let delimiter = delimiter.as_slice();
    let dash_boundary = &delimiter[2..];

    let mut cursor = match first_delimiter(body, dash_boundary) {
        Some(Tail::Open(after)) => after,
        Some(Tail::Close) => return Ok(Vec::new()),
        None => return Err(MultipartError::NoDelimiter),
    };
    let mut parts = Vec::new();
    loop {
        if parts.len() == MAX_PARTS {
            return Err(MultipartError::TooManyParts);
        }
        let number = parts.len() + 1;
        let (headers, data_start) = headers(body, cursor, number)?;
        let (data_end, tail) = next_delimiter(body, data_start, delimiter)
            .ok_or(MultipartError::MissingClosingDelimiter)?;
        parts.push(part(headers, &body[data_start..data_end], number)?);
        match tail {
            Tail::Open(after) => cursor = after,
            Tail::Close => return Ok(parts),
        }
    }
}

/// The `boundary` parameter of a `multipart/form-data` content type.
fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let (media_type, params) = content_type.split_once(';').unwrap_or((content_type, ""));
    if !media_type
        .trim()
        .eq_ignore_ascii_case("multipart/form-data")
    {
        return Err(MultipartError::NotMultipart(content_type.to_owned()));
    }
    let boundary = parameters(params)
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("boundary"))
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
        .ok_or(MultipartError::MissingBoundary)?;
    let len = boundary.chars().count();
    if len > MAX_BOUNDARY_LEN {
        return Err(MultipartError::BoundaryTooLong(len));
    }
    Ok(boundary)
}

/// What follows `--boundary` in a delimiter line.
#[derive(Debug, PartialEq, Eq)]
enum Tail {
    /// `--`: the close delimiter; what follows is the epilogue.
    Close,
    /// Optional spaces and a line end; a part's headers start at this index.
    Open(usize),
}

/// Reads the tail of a delimiter whose `--boundary` ends just before `at`;
/// `None` when these bytes only begin like a delimiter.
fn tail(body: &[u8], at: usize) -> Option<Tail> {
    let rest = body.get(at..)?;
    if rest.starts_with(b"--") {
        return Some(Tail::Close);
    }
    let padding = rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    let rest = &rest[padding..];
    if rest.starts_with(b"\r\n") {
        Some(Tail::Open(at + padding + 2))
    } else if rest.starts_with(b"\n") {
        Some(Tail::Open(at + padding + 1))
    } else {
        None
    }
}

/// The first delimiter: `--boundary` at the very start or at a line start.
fn first_delimiter(body: &[u8], dash_boundary: &[u8]) -> Option<Tail> {
    let mut from = 0;
    while let Some(at) = find(body, dash_boundary, from) {
        if at == 0 || body[at - 1] == b'\n' {
            if let Some(tail) = tail(body, at + dash_boundary.len()) {
                return Some(tail);
            }
        }
        from = at + 1;
    }
    None
}

/// The next CRLF `--boundary` delimiter at or after `from`: where the part's
/// data ends, and what the delimiter opens.
fn next_delimiter(body: &[u8], from: usize, delimiter: &[u8]) -> Option<(usize, Tail)> {
    let mut from = from;
    while let Some(at) = find(body, delimiter, from) {
        if let Some(tail) = tail(body, at + delimiter.len()) {
            return Some((at, tail));
        }
        from = at + 1;
    }
    None
}

/// The first index at or after `from` where `needle` (not empty) occurs.
fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut at = from;
    while let Some(offset) = haystack.get(at..)?.iter().position(|&b| b == first) {
        let start = at + offset;
        let end = start + needle.len();
        if end > haystack.len() {
            return None;
        }
        if &haystack[start + 1..end] == rest {
            return Some(start);
        }
        at = start + 1;
    }
    None
}

/// One header: its name in lower case, and its value.
type Header = (String, String);

/// Reads the header block that starts at `start`, up to and including its
/// blank line: the headers, and where the part's data starts. Lines may end in
/// CRLF or a bare LF; a line starting with a space or tab continues the last.
fn headers(
    body: &[u8],
    start: usize,
    number: usize,
) -> Result<(Vec<Header>, usize), MultipartError> {
    let mut headers: Vec<Header> = Vec::new();
    let mut cursor = start;
    loop {
        let window_end = body.len().min(start + MAX_HEADER_BYTES);
        let line_end = body
            .get(cursor..window_end)
            .and_then(|window| window.iter().position(|&b| b == b'\n'))
            .map(|offset| cursor + offset);
        let Some(line_end) = line_end else {
            return Err(if window_end < body.len() {
                MultipartError::HeadersTooLarge(number)
            } else {
                MultipartError::MissingClosingDelimiter
            });
        };
        let raw = &body[cursor..line_end];
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        cursor = line_end + 1;
        if raw.is_empty() {
            return Ok((headers, cursor));
        }
        let line = std::str::from_utf8(raw).map_err(|_| MultipartError::NonUtf8Header(number))?;
        if line.starts_with([' ', '\t']) {
            let (_, value) = headers
                .last_mut()
                .ok_or(MultipartError::MalformedHeader(number))?;
            value.push(' ');
            value.push_str(line.trim());
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(MultipartError::MalformedHeader(number))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
}

/// Builds part `number` from its headers and data.
fn part(headers: Vec<Header>, data: &[u8], number: usize) -> Result<Part, MultipartError> {
    let mut disposition = None;
    let mut content_type = None;
    for (name, value) in headers {
        match name.as_str() {
            "content-disposition" if disposition.is_none() => disposition = Some(value),
            "content-type" if content_type.is_none() => content_type = Some(value),
            _ => {}
        }
    }
    let disposition = disposition.ok_or(MultipartError::MissingContentDisposition(number))?;
    // The disposition type (`form-data`) comes first; the parameters follow.
    let params = parameters(disposition.split_once(';').map_or("", |(_, params)| params));
    let param = |wanted: &str| {
        params
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(wanted))
            .map(|(_, value)| value.clone())
    };
    let name = param("name").ok_or(MultipartError::MissingName(number))?;
    let filename = match param("filename*") {
        Some(extended) => {
            Some(extended_value(&extended).ok_or(MultipartError::InvalidExtendedFilename(number))?)
        }
        None => param("filename"),
    };
    Ok(Part {
        name,
        filename,
        content_type: content_type.filter(|value| !value.is_empty()),
        data: data.to_vec(),
    })
}

/// The `;`-separated `name=value` parameters of a header value (after its
/// first item), values unquoted: a quoted string may hold `;` and
/// backslash-escaped characters. Parameters without `=` are skipped.
fn parameters(text: &str) -> Vec<(String, String)> {
    let mut params = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|&c| c == ';' || c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return params;
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|&c| c != '=' && c != ';') {
            name.push(c);
        }
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        while chars.next_if(|&c| c == ' ' || c == '\t').is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
            // Anything between the closing quote and the next `;` is dropped.
            while chars.next_if(|&c| c != ';').is_some() {}
        } else {
            while let Some(c) = chars.next_if(|&c| c != ';') {
                value.push(c);
            }
            value.truncate(value.trim_end().len());
        }
        params.push((name.trim().to_owned(), value));
    }
}

/// Decodes an RFC 5987 `ext-value`: `charset'language'percent-encoded`, for
/// the charsets UTF-8 and ISO-8859-1.
fn extended_value(text: &str) -> Option<String> {
    let mut fields = text.splitn(3, '\'');
    let (charset, _language, encoded) = (fields.next()?, fields.next()?, fields.next()?);
    let bytes = percent_decode(encoded)?;
    if charset.eq_ignore_ascii_case("utf-8") {
        String::from_utf8(bytes).ok()
    } else if charset.eq_ignore_ascii_case("iso-8859-1") {
        Some(bytes.into_iter().map(char::from).collect())
    } else {
        None
    }
}

/// `%XX` sequences to bytes; `None` when a `%` is not followed by two hex digits.
fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small PNG-like payload: the signature, then bytes that look like line
    /// ends and boundary starts.
    const BINARY: &[u8] =
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\r\n--\r\n--X-BOUNDAR\n--------\r\r\n\xff\xfe";

    fn body(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn curl_body() {
        // As `curl -F image=@x.png -F type=input` sends it.
        let boundary = "------------------------d74496d66958873e";
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let body = body(&[
            b"--------------------------d74496d66958873e\r\n",
            b"Content-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n",
            b"Content-Type: image/png\r\n",
            b"\r\n",
            BINARY,
            b"\r\n--------------------------d74496d66958873e\r\n",
            b"Content-Disposition: form-data; name=\"type\"\r\n",
            b"\r\n",
            b"input",
            b"\r\n--------------------------d74496d66958873e--\r\n",
        ]);
        let parts = parse(&content_type, &body).unwrap();
        assert_eq!(
            parts,
            vec![
                Part {
                    name: "image".into(),
                    filename: Some("x.png".into()),
                    content_type: Some("image/png".into()),
                    data: BINARY.to_vec(),
                },
                Part {
                    name: "type".into(),
                    filename: None,
                    content_type: None,
                    data: b"input".to_vec()
                },
            ]
        );
    }

    #[test]
    fn python_requests_body() {
        // As `requests.post(url, files={"image": ("x.png", data, "image/png")},
        // data={"type": "input", "overwrite": "true"})` sends it: text fields
        // first, no Content-Type on them, no trailing line end.
        let content_type = "multipart/form-data; boundary=9a4e0c1f6a1a7c3c2d5a1c6d1e2f3a4b";
        let body = body(&[
            b"--9a4e0c1f6a1a7c3c2d5a1c6d1e2f3a4b\r\n",
            b"Content-Disposition: form-data; name=\"type\"\r\n\r\n",
            b"input\r\n",
            b"--9a4e0c1f6a1a7c3c2d5a1c6d1e2f3a4b\r\n",
            b"Content-Disposition: form-data; name=\"overwrite\"\r\n\r\n",
            b"true\r\n",
            b"--9a4e0c1f6a1a7c3c2d5a1c6d1e2f3a4b\r\n",
            b"Content-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n",
            b"Content-Type: image/png\r\n\r\n",
            BINARY,
            b"\r\n--9a4e0c1f6a1a7c3c2d5a1c6d1e2f3a4b--\r\n",
        ]);
        let parts = parse(content_type, &body).unwrap();
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["type", "overwrite", "image"]);
        assert_eq!(parts[1].data, b"true");
        assert_eq!(parts[2].filename.as_deref(), Some("x.png"));
        assert_eq!(parts[2].data, BINARY);
    }

    #[test]
    fn browser_form_data_body() {
        // As Chrome sends a FormData with a file, an empty subfolder and a
        // UTF-8 file name written raw; the boundary is quoted here, which
        // browsers do not do but RFC 2045 allows.
        let content_type =
            "Multipart/Form-Data; boundary=\"----WebKitFormBoundaryn3GkKq7bS3Y5kqWZ\"";
        let body = body(&[
            b"------WebKitFormBoundaryn3GkKq7bS3Y5kqWZ\r\n",
            b"Content-Disposition: form-data; name=\"image\"; filename=\"caf\xc3\xa9 \\\"1\\\".png\"\r\n",
            b"Content-Type: image/png\r\n\r\n",
            BINARY,
            b"\r\n------WebKitFormBoundaryn3GkKq7bS3Y5kqWZ\r\n",
            b"Content-Disposition: form-data; name=\"subfolder\"\r\n\r\n",
            b"\r\n------WebKitFormBoundaryn3GkKq7bS3Y5kqWZ\r\n",
            b"Content-Disposition: form-data; name=\"type\"\r\n\r\n",
            b"input\r\n",
            b"------WebKitFormBoundaryn3GkKq7bS3Y5kqWZ--\r\n",
        ]);
        let parts = parse(content_type, &body).unwrap();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].filename.as_deref(), Some("café \"1\".png"));
        assert_eq!(parts[0].data, BINARY);
        assert_eq!(parts[1].name, "subfolder");
        assert!(parts[1].data.is_empty());
        assert_eq!(parts[2].data, b"input");
    }

    #[test]
    fn extended_filename_preamble_epilogue_and_bare_lf_headers() {
        let content_type = "multipart/form-data; charset=utf-8; BOUNDARY=b";
        let body = body(&[
            b"This is a preamble.\r\n--b is not a delimiter here\r\n",
            b"--b  \n",
            b"content-disposition: form-data;\n name=\"image\"; filename=\"plain.png\"; filename*=UTF-8''%E2%82%AC%20rates.png\n",
            b"CONTENT-TYPE: image/png\n\n",
            b"\r\n--bb\r\n--b-\r\n",
            b"\r\n--b--",
            b"\r\nepilogue\r\n--b\r\nContent-Disposition: form-data; name=\"ignored\"\r\n\r\n",
        ]);
        let parts = parse(content_type, &body).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].name, "image");
        assert_eq!(parts[0].filename.as_deref(), Some("€ rates.png"));
        assert_eq!(parts[0].content_type.as_deref(), Some("image/png"));
        assert_eq!(parts[0].data, b"\r\n--bb\r\n--b-\r\n");
    }

    #[test]
    fn iso_8859_1_filename_and_empty_form() {
        let body = b"--b\r\nContent-Disposition: form-data; name=f; filename*=iso-8859-1'en'%E9t%E9.txt\r\n\r\n\r\n--b--";
        let parts = parse("multipart/form-data; boundary=b", body).unwrap();
        assert_eq!(parts[0].name, "f");
        assert_eq!(parts[0].filename.as_deref(), Some("été.txt"));
        assert!(parts[0].data.is_empty());
        assert_eq!(
            parse("multipart/form-data; boundary=b", b"--b--\r\n").unwrap(),
            vec![]
        );
    }

    fn error(content_type: &str, body: &[u8]) -> MultipartError {
        parse(content_type, body).unwrap_err()
    }

    #[test]
    fn content_type_errors() {
        let ok_body = b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b--";
        assert_eq!(
            error("application/json", ok_body),
            MultipartError::NotMultipart("application/json".into())
        );
        assert_eq!(
            error("multipart/mixed; boundary=b", ok_body),
            MultipartError::NotMultipart("multipart/mixed; boundary=b".into())
        );
        assert_eq!(
            error("multipart/form-data", ok_body),
            MultipartError::MissingBoundary
        );
        assert_eq!(
            error("multipart/form-data; boundary=\"\"", ok_body),
            MultipartError::MissingBoundary
        );
        let long = "x".repeat(71);
        assert_eq!(
            error(&format!("multipart/form-data; boundary={long}"), ok_body),
            MultipartError::BoundaryTooLong(71)
        );
        let seventy = "y".repeat(70);
        let body = format!(
            "--{seventy}\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--{seventy}--"
        );
        assert_eq!(
            parse(
                &format!("multipart/form-data; boundary={seventy}"),
                body.as_bytes()
            )
            .unwrap()
            .len(),
            1
        );
    }

    #[test]
    fn body_errors() {
        let ct = "multipart/form-data; boundary=b";
        assert_eq!(
            error(ct, b"no delimiter at all"),
            MultipartError::NoDelimiter
        );
        assert_eq!(error(ct, b"--bb\r\n"), MultipartError::NoDelimiter);
        assert_eq!(
            error(
                ct,
                b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b\r\n"
            ),
            MultipartError::MissingClosingDelimiter
        );
        assert_eq!(
            error(
                ct,
                b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx"
            ),
            MultipartError::MissingClosingDelimiter
        );
        assert_eq!(
            error(ct, b"--b\r\nContent-Disposition: form-data; name=a\r\n"),
            MultipartError::MissingClosingDelimiter
        );
        assert_eq!(
            error(ct, b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--"),
            MultipartError::MissingContentDisposition(1)
        );
        assert_eq!(
            error(
                ct,
                b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n\r\n--b\r\nContent-Disposition: form-data; filename=\"x\"\r\n\r\n\r\n--b--"
            ),
            MultipartError::MissingName(2)
        );
        assert_eq!(
            error(
                ct,
                b"--b\r\nContent-Disposition form-data\r\n\r\nx\r\n--b--"
            ),
            MultipartError::MalformedHeader(1)
        );
        assert_eq!(
            error(ct, b"--b\r\n continued\r\n\r\nx\r\n--b--"),
            MultipartError::MalformedHeader(1)
        );
        assert_eq!(
            error(
                ct,
                b"--b\r\nContent-Disposition: form-data; name=\"\xff\"\r\n\r\nx\r\n--b--"
            ),
            MultipartError::NonUtf8Header(1)
        );
        for bad in [
            "UTF-8''%E2%82",
            "UTF-8''%G0",
            "UTF-8''%4",
            "KOI8-R''abc",
            "no-quotes",
        ] {
            let body = format!(
                "--b\r\nContent-Disposition: form-data; name=a; filename*={bad}\r\n\r\nx\r\n--b--"
            );
            assert_eq!(
                error(ct, body.as_bytes()),
                MultipartError::InvalidExtendedFilename(1),
                "{bad}"
            );
        }
    }

    #[test]
    fn limits() {
        let ct = "multipart/form-data; boundary=b";
        let field = b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n".as_slice();
        let at_limit = [field.repeat(MAX_PARTS), b"--b--".to_vec()].concat();
        assert_eq!(parse(ct, &at_limit).unwrap().len(), MAX_PARTS);
        let over = [field.repeat(MAX_PARTS + 1), b"--b--".to_vec()].concat();
        assert_eq!(error(ct, &over), MultipartError::TooManyParts);

        let header = |len: usize| {
            let filler = "a".repeat(len - "X: \r\n".len());
            format!(
                "--b\r\nX: {filler}\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b--"
            )
        };
        // The block is the filler line, the disposition line and the blank line.
        let rest = "Content-Disposition: form-data; name=a\r\n\r\n".len();
        assert_eq!(
            parse(ct, header(MAX_HEADER_BYTES - rest).as_bytes())
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            error(ct, header(MAX_HEADER_BYTES - rest + 1).as_bytes()),
            MultipartError::HeadersTooLarge(1)
        );
        assert_eq!(
            error(ct, header(100_000).as_bytes()),
            MultipartError::HeadersTooLarge(1)
        );
    }

    #[test]
    fn messages_say_what_to_fix() {
        assert!(MultipartError::MissingBoundary
            .to_string()
            .contains("boundary="));
        assert!(MultipartError::MissingName(2)
            .to_string()
            .contains("part 2"));
        assert!(MultipartError::TooManyParts.to_string().contains("32"));
    }

    /// A deterministic xorshift generator for the no-panic loops.
    struct Bytes(u64);

    impl Bytes {
        fn next(&mut self) -> u8 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 24) as u8
        }
    }

    #[test]
    fn never_panics() {
        let ct = "multipart/form-data; boundary=b";
        let valid = body(&[
            b"preamble\r\n--b\r\n",
            b"Content-Disposition: form-data; name=\"image\"; filename*=UTF-8''x%20y.png\r\n",
            b"Content-Type: image/png\r\n\r\n",
            BINARY,
            b"\r\n--b\r\nContent-Disposition: form-data; name=type\r\n\r\ninput\r\n--b--\r\n",
        ]);
        assert_eq!(parse(ct, &valid).unwrap().len(), 2);
        // Cut anywhere before the close delimiter's last dash, the body must
        // be refused, not panic; from there on the epilogue is all that is cut.
        let complete = valid.len() - "\r\n".len();
        for end in 0..complete {
            assert!(parse(ct, &valid[..end]).is_err(), "truncated at {end}");
        }
        assert_eq!(parse(ct, &valid[..complete]).unwrap().len(), 2);
        // Random bytes, and random bytes drawn from the alphabet of forms.
        let alphabet = b"-b\r\n:;=\"\\ %'*Content-Disposition: form-data; name=filename";
        let mut random = Bytes(0x9e37_79b9_7f4a_7c15);
        for round in 0..2000 {
            let len = usize::from(random.next()) + usize::from(random.next() % 4) * 256;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let b = random.next();
                    if round % 2 == 0 {
                        b
                    } else {
                        alphabet[usize::from(b) % alphabet.len()]
                    }
                })
                .collect();
            let _ = parse(ct, &bytes);
            let _ = parse(&String::from_utf8_lossy(&bytes), &valid);
            // Random bytes spliced into the valid body.
            let mut spliced = valid.clone();
            let at = usize::from(random.next()) * spliced.len() / 256;
            spliced.splice(at..at, bytes.iter().copied().take(16));
            let _ = parse(ct, &spliced);
        }
    }
}
