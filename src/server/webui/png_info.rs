//! `POST /sdapi/v1/png-info`: the generation parameters a PNG carries, read
//! back (A1111's `PNGInfoResponse`): `info` is the `parameters` text chunk,
//! `items` the other text chunks (ours: `fluxlora`, the request as JSON), and
//! `parameters` the infotext split as A1111's `parse_generation_parameters`
//! does: `Prompt`, `Negative prompt` and each `Key: value` of the last line.
//!
//! Must not: decode pixels; only the PNG's text chunks are read.

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde_json::{json, Map, Value};

use super::errors::WebuiError;
use super::img2img::base64_field;
use crate::sample::png_meta::read_text_chunks;
use crate::server::route_table::RouteTable;

pub(super) fn routes(table: &mut RouteTable) {
    table.add(Method::POST, "/sdapi/v1/png-info", png_info);
}

/// The `Key: value, …` pairs of an infotext's last line (quoted values kept whole).
fn pairs(line: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut rest = line.trim();
    while let Some((key, after)) = rest.split_once(": ") {
        let (value, next) = if after.starts_with('"') {
            let mut de = serde_json::Deserializer::from_str(after).into_iter::<String>();
            match de.next() {
                Some(Ok(v)) => {
                    let used = de.byte_offset();
                    (v, after[used..].trim_start_matches(',').trim_start())
                }
                _ => (after.to_string(), ""),
            }
        } else {
            match after.split_once(", ") {
                Some((v, next)) => (v.to_string(), next),
                None => (after.to_string(), ""),
            }
        };
        out.push((key.trim().to_string(), value));
        rest = next;
    }
    out
}

/// A1111's split of an infotext into its parts.
pub(super) fn parse_infotext(text: &str) -> Map<String, Value> {
    let mut lines: Vec<&str> = text.lines().collect();
    let mut parameters = Map::new();
    let last_is_pairs = lines.last().is_some_and(|l| l.contains("Steps: "));
    if last_is_pairs {
        for (k, v) in pairs(lines.pop().unwrap_or_default()) {
            parameters.insert(k, json!(v));
        }
    }
    let (mut prompt, mut negative) = (vec![], vec![]);
    for line in lines {
        match line.strip_prefix("Negative prompt: ") {
            Some(n) => negative.push(n),
            None if !negative.is_empty() => negative.push(line),
            None => prompt.push(line),
        }
    }
    parameters.insert("Prompt".into(), json!(prompt.join("\n")));
    parameters.insert("Negative prompt".into(), json!(negative.join("\n")));
    parameters
}

async fn png_info(body: web::Json<Value>) -> Result<HttpResponse, WebuiError> {
    let image = body
        .get("image")
        .and_then(Value::as_str)
        .ok_or_else(|| WebuiError::field("image", "give the PNG as a base64 string"))?;
    let bytes = base64_field("image", image)?;
    let chunks = read_text_chunks(&bytes)
        .map_err(|e| WebuiError::field("image", format!("not a readable PNG: {e}")))?;
    let info = chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let items: Map<String, Value> = chunks
        .into_iter()
        .filter(|(k, _)| k != "parameters")
        .map(|(k, v)| (k, json!(v)))
        .collect();
    let parameters = if info.is_empty() {
        Map::new()
    } else {
        parse_infotext(&info)
    };
    Ok(HttpResponse::Ok().json(json!({"info": info, "items": items, "parameters": parameters})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infotexts_split_as_a1111_reads_them() {
        let text = "a zorbly circle <lora:z:0.8>\nNegative prompt: blurry\nSteps: 20, Sampler: Euler, CFG scale: 1, Seed: 7, Size: 64x64, Model: \"tiny, v2\", Lora hashes: \"z: 0123456789ab\", Version: fluxlora 0.1.0";
        let p = parse_infotext(text);
        assert_eq!(p["Prompt"], "a zorbly circle <lora:z:0.8>");
        assert_eq!(p["Negative prompt"], "blurry");
        assert_eq!(p["Steps"], "20");
        assert_eq!(p["Model"], "tiny, v2");
        assert_eq!(p["Lora hashes"], "z: 0123456789ab");
        assert_eq!(p["Version"], "fluxlora 0.1.0");
        let plain = parse_infotext("just a prompt");
        assert_eq!(plain["Prompt"], "just a prompt");
        assert_eq!(plain.len(), 2);
    }
}
