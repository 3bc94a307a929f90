//! Ids in ComfyUI's forms: prompt ids are canonical lower-case hyphenated UUIDs
//! (version 4), socket ids their 32-digit hex (`uuid4().hex`).
//!
//! They need to be unique, not secret: each is a SHA-256 of the time, the
//! process id and a per-process counter.

use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn random_bytes() -> [u8; 16] {
    let mut hasher = Sha256::new();
    hasher.update(format!(
        "{:?}/{}/{}",
        std::time::SystemTime::now(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    bytes
}

/// `xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`.
pub(crate) fn uuid4() -> String {
    let hex = hex32();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// 32 hex digits, as Python's `uuid4().hex`.
pub(crate) fn hex32() -> String {
    crate::hex::hex(&random_bytes())
}

/// Whether `id` is a canonical lower-case hyphenated UUID (ComfyUI's
/// `validate_job_id`: `str(uuid.UUID(id)) == id`).
pub(crate) fn is_canonical_uuid(id: &str) -> bool {
    let groups: Vec<&str> = id.split('-').collect();
    let lengths = [8, 4, 4, 4, 12];
    groups.len() == 5
        && groups.iter().zip(lengths).all(|(g, n)| {
            g.len() == n
                && g.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_canonical_and_distinct() {
        let a = uuid4();
        assert!(is_canonical_uuid(&a), "{a}");
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, uuid4());
        assert_eq!(hex32().len(), 32);
        for bad in [
            "",
            "x",
            "ABCDEF01-2345-4678-9abc-def012345678",
            "0123456789abcdef0123456789abcdef",
        ] {
            assert!(!is_canonical_uuid(bad), "{bad}");
        }
    }
}
