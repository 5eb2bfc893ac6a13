//! A safetensors file's header (tensor names and shapes), read without the tensors: the
//! gateway checks add-ons against a model before queueing a job, and has no engine to load them.

use std::path::Path;

/// Each tensor's shape by name (8 bytes of header length, then the JSON header).
pub(crate) fn read(path: &Path) -> std::io::Result<std::collections::BTreeMap<String, Vec<usize>>> {
    use std::io::Read;
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut f = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > 64 << 20 {
        return Err(invalid(format!("a {len}-byte safetensors header")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).map_err(|e| invalid(e.to_string()))?;
    Ok(header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let shape = v.get("shape").and_then(|s| s.as_array()).map(|s| s.iter().filter_map(|d| d.as_u64()).map(|d| d as usize).collect()).unwrap_or_default();
            (k, shape)
        })
        .collect())
}
