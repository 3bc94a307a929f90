//! Checking a LoRA against a model and describing it: [`validate`] lists every module
//! that does not fit, [`describe`] builds what `fluxlora lora inspect` and
//! `GET /v1/loras/{name}` show.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::{LoraFile, LoraFormat, LoraIoError};
use crate::model::adapter::{check_fits, Lora};
use crate::model::keymap::{self, ModuleGroup};

/// Checks a LoRA against the model's linear shapes, `module → (out_features,
/// in_features)`. Every module the model lacks and every shape mismatch is listed in
/// one [`LoraIoError::Incompatible`] naming the LoRA; so is a LoRA with no layer at
/// all (a safetensors file of something else), which would change nothing.
pub fn validate(lora: &Lora, shapes: &BTreeMap<String, (usize, usize)>) -> Result<(), LoraIoError> {
    let mut problems = Vec::new();
    if lora.layers.is_empty() {
        problems.push(
            "no LoRA layer: none of its tensors is a LoRA weight in a format this reader knows"
                .to_string(),
        );
    }
    for (module, layer) in &lora.layers {
        match shapes.get(module) {
            None => problems.push(format!("`{module}`: no such module in the model")),
            Some(&(out_f, in_f)) => {
                if let Err(e) = check_fits(module, layer, out_f, in_f) {
                    problems.push(e);
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LoraIoError::Incompatible {
            file: lora.name.clone(),
            problems,
        })
    }
}

/// What `fluxlora lora inspect` shows about a LoRA file.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct LoraReport {
    pub name: String,
    pub format: LoraFormat,
    pub modules: usize,
    /// rank → number of modules.
    pub ranks: BTreeMap<usize, usize>,
    /// alpha (as written) → number of modules.
    pub alphas: BTreeMap<String, usize>,
    /// Double-stream block indices targeted.
    pub double_blocks: Vec<usize>,
    /// Single-stream block indices targeted.
    pub single_blocks: Vec<usize>,
    pub double_modules: usize,
    pub single_modules: usize,
    /// Modules outside the blocks (embedders, final layer).
    pub other_modules: Vec<String>,
    /// Number of LoRA parameters (down + up elements).
    pub parameters: usize,
    pub text_encoder_keys: Vec<String>,
    pub unmatched: Vec<String>,
    pub metadata: BTreeMap<String, String>,
}

/// Summarises a parsed LoRA file.
pub fn describe(file: &LoraFile) -> LoraReport {
    let mut ranks = BTreeMap::new();
    let mut alphas = BTreeMap::new();
    let mut doubles = BTreeSet::new();
    let mut singles = BTreeSet::new();
    let (mut n_double, mut n_single) = (0, 0);
    let mut other = Vec::new();
    let mut parameters = 0;
    for (module, layer) in &file.lora.layers {
        *ranks.entry(layer.rank()).or_insert(0) += 1;
        *alphas.entry(format!("{}", layer.alpha)).or_insert(0) += 1;
        parameters += layer.down.elem_count() + layer.up.elem_count();
        match keymap::module_group(module) {
            ModuleGroup::Double(n) => {
                doubles.insert(n);
                n_double += 1;
            }
            ModuleGroup::Single(n) => {
                singles.insert(n);
                n_single += 1;
            }
            ModuleGroup::Other => other.push(module.clone()),
        }
    }
    LoraReport {
        name: file.lora.name.clone(),
        format: file.format,
        modules: file.lora.layers.len(),
        ranks,
        alphas,
        double_blocks: doubles.into_iter().collect(),
        single_blocks: singles.into_iter().collect(),
        double_modules: n_double,
        single_modules: n_single,
        other_modules: other,
        parameters,
        text_encoder_keys: file.text_encoder.clone(),
        unmatched: file.unmatched.clone(),
        metadata: file.metadata.clone(),
    }
}

fn ranges(ix: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ix.len() {
        let start = ix[i];
        let mut end = start;
        while i + 1 < ix.len() && ix[i + 1] == end + 1 {
            i += 1;
            end = ix[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

impl fmt::Display for LoraReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX_LIST: usize = 10;
        const MAX_VALUE: usize = 160;
        let counts = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, n)| format!("{k} ×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "name:        {}", self.name)?;
        writeln!(f, "format:      {}", self.format)?;
        writeln!(
            f,
            "modules:     {} ({} parameters)",
            self.modules, self.parameters
        )?;
        let ranks: BTreeMap<String, usize> = self
            .ranks
            .iter()
            .map(|(r, n)| (r.to_string(), *n))
            .collect();
        writeln!(f, "rank:        {}", counts(&ranks))?;
        writeln!(f, "alpha:       {}", counts(&self.alphas))?;
        writeln!(
            f,
            "double:      {} modules in blocks {}",
            self.double_modules,
            ranges(&self.double_blocks)
        )?;
        writeln!(
            f,
            "single:      {} modules in blocks {}",
            self.single_modules,
            ranges(&self.single_blocks)
        )?;
        writeln!(
            f,
            "other:       {}",
            if self.other_modules.is_empty() {
                "none".to_string()
            } else {
                self.other_modules.join(", ")
            }
        )?;
        let list = |f: &mut fmt::Formatter<'_>, title: &str, keys: &[String]| -> fmt::Result {
            writeln!(f, "{title:<12} {}", keys.len())?;
            for k in keys.iter().take(MAX_LIST) {
                writeln!(f, "  {k}")?;
            }
            if keys.len() > MAX_LIST {
                writeln!(f, "  … and {} more", keys.len() - MAX_LIST)?;
            }
            Ok(())
        };
        list(f, "text encoder:", &self.text_encoder_keys)?;
        list(f, "unmatched:", &self.unmatched)?;
        writeln!(f, "metadata:    {} entries", self.metadata.len())?;
        for (k, v) in &self.metadata {
            let v: String = if v.chars().count() > MAX_VALUE {
                v.chars().take(MAX_VALUE).chain("…".chars()).collect()
            } else {
                v.clone()
            };
            writeln!(f, "  {k}: {v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::lora_io::parse;
    use crate::model::lora_io::test_support::*;

    #[test]
    fn validate_names_the_modules() {
        let lora = reference();
        let mut shapes: BTreeMap<String, (usize, usize)> = MODULES
            .iter()
            .map(|(m, in_f, out, _)| (m.to_string(), (*out, *in_f)))
            .collect();
        validate(&lora, &shapes).unwrap();
        shapes.insert("single_blocks.1.linear2".into(), (H, 6 * H));
        shapes.remove("time_in.in_layer");
        let err = validate(&lora, &shapes).unwrap_err().to_string();
        assert!(err.contains("ref"), "{err}");
        assert!(err.contains("single_blocks.1.linear2"), "{err}");
        assert!(err.contains("time_in.in_layer"), "{err}");
        assert!(!err.contains("img_attn.qkv"), "{err}");
    }

    #[test]
    fn report_counts_groups() {
        let f = parse(kohya_dict(&reference()), BTreeMap::new(), "r").unwrap();
        let r = describe(&f);
        assert_eq!(r.modules, 6);
        assert_eq!(r.double_blocks, vec![0]);
        assert_eq!(r.single_blocks, vec![1]);
        assert_eq!((r.double_modules, r.single_modules), (2, 2));
        assert_eq!(
            r.other_modules,
            vec!["final_layer.adaLN_modulation.1", "time_in.in_layer"]
        );
        assert_eq!(r.ranks.get(&R), Some(&6));
        assert!(r.to_string().contains("format:      kohya"));
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert!(serde_json::to_string(&r)
            .unwrap()
            .contains("\"format\":\"kohya\""));
    }
}
