//! Decision traces are stored compressed (LZ4 block format with the length in front).
//!
//! A trace is ~5 KB of JSON that repeats itself (37 checks with the same keys): compressed it is
//! ~1.5 KB, small enough to stay in its table page. Uncompressed it needs an overflow page, and
//! every page is one more 4 KB frame written to the log, and later to the database file, before
//! the client hears "accepted". Rows written before compression (JSON `TEXT`) still read: they are
//! told apart by SQLite's storage class (`BLOB` for packed ones).

use crate::{StoreError, TraceJson};

/// Largest trace a stored length may claim (a corrupt length must not allocate gigabytes).
const MAX_UNPACKED: usize = 64 * 1024 * 1024;

/// Packs a trace for storage.
pub(crate) fn pack(body: &TraceJson) -> Vec<u8> {
    lz4_flex::block::compress_prepend_size(body.as_bytes())
}

/// Reads a stored trace: `packed` when its storage class is `BLOB`, else JSON text.
pub(crate) fn unpack(bytes: Vec<u8>, packed: bool) -> Result<TraceJson, StoreError> {
    let corrupt = |e: Box<dyn std::error::Error + Send + Sync>| StoreError::corrupt(e);
    if !packed {
        return Ok(TraceJson(bytes));
    }
    let (len, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or_else(|| corrupt("packed decision trace is truncated".into()))?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_UNPACKED {
        return Err(corrupt(
            format!("packed decision trace claims {len} bytes").into(),
        ));
    }
    let json = lz4_flex::block::decompress(rest, len).map_err(|e| corrupt(Box::new(e)))?;
    Ok(TraceJson(json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_round_trip_and_shrink() {
        let checks: Vec<_> = (0..37)
            .map(|i| serde_json::json!({"check": "authn", "code": format!("auth.c{i}"), "outcome": "pass", "detail": "credential accepted", "remedy": null}))
            .collect();
        let body =
            TraceJson::from(serde_json::json!({"decision": {"allowed": true, "checks": checks}}));
        let packed = pack(&body);
        assert!(
            packed.len() * 3 < body.as_bytes().len(),
            "{} bytes",
            packed.len()
        );
        assert_eq!(unpack(packed, true).unwrap(), body);
        // Rows from before compression: plain JSON text.
        assert_eq!(unpack(body.as_bytes().to_vec(), false).unwrap(), body);
    }

    #[test]
    fn corrupt_packed_rows_are_errors_not_panics_or_huge_allocations() {
        assert!(unpack(vec![], true).is_err());
        assert!(unpack(vec![1, 2], true).is_err());
        assert!(unpack(vec![0xff, 0xff, 0xff, 0xff, 0], true).is_err());
        assert!(unpack(vec![10, 0, 0, 0, 0xf0, 1, 2], true).is_err());
    }
}
