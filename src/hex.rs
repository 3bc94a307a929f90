//! Lowercase hexadecimal of bytes: the one spelling of hashes and random ids
//! (kohya's `sshs_model_hash`, A1111's LoRA hashes, ComfyUI's prompt ids, the
//! session cookie, file names made from content hashes).

/// `bytes` as lowercase hex, two digits each.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_lowercase_digits_per_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::hex(&[]), "");
    }
}
