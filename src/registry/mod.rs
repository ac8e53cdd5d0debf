//! The model registry: versions, aliases, persistence, audit log.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Hex SHA-256 over a model's weights: the GGUF file, or the folder's
/// safetensors files in name order.
pub fn digest_path(path: &Path) -> anyhow::Result<String> {
    let mut files = vec![];
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) == Some("safetensors") {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = std::fs::File::open(&f)?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex::encode(h.finalize()))
}
