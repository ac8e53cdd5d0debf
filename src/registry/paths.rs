//! What a path an admin names may reach, beyond a model's own folder:
//! training data, replay data, a parent card's `data.files` and a drift
//! reference are read only from under the data roots (the model roots and
//! the capture directory), only as regular files at every level of a
//! folder, each and all together under a size cap. The checks run before
//! anything is opened; the answer for a path that does not exist is the
//! same as for one outside the roots, so they are no existence oracle.

use std::path::{Path, PathBuf};

/// Largest file read as training or reference data.
pub const MAX_DATA_FILE_BYTES: u64 = 1 << 30;
/// Largest total a data path may reach.
pub const MAX_DATA_BYTES: u64 = 8 << 30;
/// Most files one data path may hold.
pub const MAX_DATA_FILES: usize = 10_000;
/// Deepest folder nesting followed.
const MAX_DEPTH: usize = 16;

/// File kinds read as data (the trainer's): text, Markdown, JSON lines, or
/// no extension.
pub fn is_data_file_name(p: &Path) -> bool {
    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
    matches!(ext, "txt" | "md" | "jsonl" | "text" | "")
}

/// The files `path` names as data, confined to `roots` (canonical
/// folders): `path` itself and every entry of a folder, after following
/// links, lies under a root; every entry is a regular file or a folder
/// (hidden entries are skipped, as the trainer skips them); no file is
/// larger than [`MAX_DATA_FILE_BYTES`], and all of them together stay under
/// [`MAX_DATA_BYTES`] and [`MAX_DATA_FILES`]. The message names the path
/// and the rule.
pub fn data_files(path: &Path, roots: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    if roots.is_empty() {
        return Err(format!(
            "{}: no folder is open to training data on this server (set --model-root)",
            path.display()
        ));
    }
    let mut walk = Walk {
        roots,
        files: vec![],
        bytes: 0,
    };
    walk.visit(path, 0)?;
    walk.files.sort();
    Ok(walk.files)
}

struct Walk<'a> {
    roots: &'a [PathBuf],
    files: Vec<PathBuf>,
    bytes: u64,
}

impl Walk<'_> {
    fn visit(&mut self, path: &Path, depth: usize) -> Result<(), String> {
        let outside = || {
            format!(
                "{} is not a file or folder under the model roots (--model-root) or the capture directory",
                path.display()
            )
        };
        let real = std::fs::canonicalize(path).map_err(|_| outside())?;
        if !self.roots.iter().any(|r| real.starts_with(r)) {
            return Err(outside());
        }
        // stat(2) on the resolved path: it opens nothing.
        let meta = std::fs::metadata(&real).map_err(|_| outside())?;
        if meta.is_dir() {
            if depth >= MAX_DEPTH {
                return Err(format!(
                    "{}: folders nested deeper than {MAX_DEPTH} levels",
                    path.display()
                ));
            }
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&real)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|e| {
                    !e.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
                })
                .collect();
            entries.sort();
            for e in entries {
                self.visit(&e, depth + 1)?;
            }
            return Ok(());
        }
        if !meta.is_file() {
            return Err(format!(
                "{} is not a regular file or a folder (devices, FIFOs and sockets are refused)",
                path.display()
            ));
        }
        if depth > 0 && !is_data_file_name(&real) {
            return Ok(());
        }
        if meta.len() > MAX_DATA_FILE_BYTES {
            return Err(format!(
                "{}: {} bytes; a data file may hold at most {MAX_DATA_FILE_BYTES}",
                path.display(),
                meta.len()
            ));
        }
        self.bytes += meta.len();
        self.files.push(real);
        if self.files.len() > MAX_DATA_FILES || self.bytes > MAX_DATA_BYTES {
            return Err(format!(
                "{}: more than {MAX_DATA_FILES} files or {MAX_DATA_BYTES} bytes of data",
                path.display()
            ));
        }
        Ok(())
    }
}

/// Whether a model or version name is safe as one path component: not
/// empty, not `.` or `..` (or any name of dots only), no separator.
pub fn is_path_component(name: &str) -> bool {
    !name.is_empty() && !name.chars().all(|c| c == '.') && !name.contains(['/', '\\', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_paths_stay_under_their_roots_and_are_regular_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.txt"), "a").unwrap();
        std::fs::write(root.join("sub/b.jsonl"), "{}").unwrap();
        std::fs::write(root.join("sub/w.safetensors"), "x").unwrap();
        std::fs::write(tmp.path().join("outside.txt"), "o").unwrap();
        let roots = vec![std::fs::canonicalize(&root).unwrap()];
        let files = data_files(&root, &roots).unwrap();
        assert_eq!(files.len(), 2, "{files:?}");

        let refused = |p: &Path| data_files(p, &roots).unwrap_err();
        assert!(refused(Path::new("/proc/self/environ")).contains("not a file or folder under"));
        assert!(refused(Path::new("/")).contains("under"));
        assert!(refused(&tmp.path().join("outside.txt")).contains("under"));
        assert!(refused(&root.join("../outside.txt")).contains("under"));
        assert!(
            refused(&root.join("missing.txt")).contains("under"),
            "no oracle"
        );
        // A link inside the root that leads out of it.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(tmp.path().join("outside.txt"), root.join("sub/l.txt"))
                .unwrap();
            assert!(refused(&root).contains("l.txt"), "{}", refused(&root));
            std::fs::remove_file(root.join("sub/l.txt")).unwrap();
            std::os::unix::fs::symlink("/dev/zero", root.join("zero")).unwrap();
            assert!(refused(&root).contains("zero"));
        }
        assert!(data_files(&root, &[]).unwrap_err().contains("--model-root"));
    }

    #[test]
    fn names_of_dots_or_with_separators_are_not_path_components() {
        for bad in ["", ".", "..", "...", "a/b", "a\\b"] {
            assert!(!is_path_component(bad), "{bad:?}");
        }
        for good in ["tiny", "v1.2", "a..b", ".hidden"] {
            assert!(is_path_component(good), "{good:?}");
        }
    }
}
