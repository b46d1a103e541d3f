//! The training corpus: source files under one or more directories, filtered by extension, split
//! into train and held-out by a hash of each file's path relative to its root, so the split does
//! not move when files are added elsewhere or the corpus is read on another machine.

use std::path::{Path, PathBuf};

use crate::error::TrainerError;

/// Held-out share of files, per mille (ALGORITHMS.md / the trainer issue: 2%).
pub const HELD_OUT_PER_MILLE: u64 = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
}

#[derive(Clone, Debug)]
pub struct Corpus {
    /// (root, path relative to the root), sorted.
    files: Vec<(PathBuf, PathBuf)>,
}

impl Corpus {
    /// Every file under `roots` whose extension is in `extensions`, skipping directories named
    /// in `skip_dirs` (site-packages, __pycache__, ...).
    pub fn discover(
        roots: &[PathBuf],
        extensions: &[&str],
        skip_dirs: &[&str],
    ) -> Result<Self, TrainerError> {
        let mut files = Vec::new();
        for root in roots {
            if !root.is_dir() {
                return Err(TrainerError::file(root, "is not a directory"));
            }
            walk(root, root, extensions, skip_dirs, &mut files)?;
        }
        files.sort();
        Ok(Self { files })
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Files of one side of the split, as full paths.
    pub fn files(&self, split: Split) -> Vec<PathBuf> {
        self.files
            .iter()
            .filter(|(_, rel)| split_of(rel) == split)
            .map(|(root, rel)| root.join(rel))
            .collect()
    }

    /// A hash of the file list (relative paths and sizes), recorded with a run so that a resumed
    /// or repeated run can tell whether it reads the same corpus.
    pub fn fingerprint(&self) -> String {
        let mut h = Fnv::new();
        for (root, rel) in &self.files {
            h.write(rel.to_string_lossy().as_bytes());
            let size = std::fs::metadata(root.join(rel)).map_or(0, |m| m.len());
            h.write(&size.to_le_bytes());
        }
        format!("{:016x}", h.0)
    }
}

/// The side of the split a relative path falls on.
pub fn split_of(rel: &Path) -> Split {
    let mut h = Fnv::new();
    h.write(rel.to_string_lossy().as_bytes());
    if h.0 % 1000 < HELD_OUT_PER_MILLE {
        Split::HeldOut
    } else {
        Split::Train
    }
}

fn walk(
    root: &Path,
    dir: &Path,
    extensions: &[&str],
    skip_dirs: &[&str],
    out: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<(), TrainerError> {
    let entries = std::fs::read_dir(dir).map_err(|e| TrainerError::file(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| TrainerError::file(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        let kind = entry
            .file_type()
            .map_err(|e| TrainerError::file(&path, e))?;
        if kind.is_dir() {
            if !skip_dirs.contains(&name.as_str()) {
                walk(root, &path, extensions, skip_dirs, out)?;
            }
        } else if kind.is_file()
            && path
                .extension()
                .is_some_and(|e| extensions.iter().any(|x| e == *x))
        {
            if let Ok(rel) = path.strip_prefix(root) {
                out.push((root.to_path_buf(), rel.to_path_buf()));
            }
        }
    }
    Ok(())
}

/// FNV-1a, 64 bit: stable across runs, platforms and Rust versions (std's hasher is not).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_filters_by_extension_and_skips_named_directories() {
        let root = std::env::temp_dir().join(format!("sdlm-corpus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (rel, text) in [
            ("a.py", "x"),
            ("pkg/b.py", "yy"),
            ("pkg/c.txt", "z"),
            ("site-packages/d.py", "w"),
        ] {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let corpus =
            Corpus::discover(std::slice::from_ref(&root), &["py"], &["site-packages"]).unwrap();
        assert_eq!(corpus.len(), 2);
        let mut all = corpus.files(Split::Train);
        all.extend(corpus.files(Split::HeldOut));
        all.sort();
        assert_eq!(all, vec![root.join("a.py"), root.join("pkg/b.py")]);
        let before = corpus.fingerprint();
        std::fs::write(root.join("pkg/b.py"), "changed").unwrap();
        assert_ne!(
            Corpus::discover(std::slice::from_ref(&root), &["py"], &["site-packages"])
                .unwrap()
                .fingerprint(),
            before
        );
        let err = Corpus::discover(&[root.join("missing")], &["py"], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing") && err.contains("not a directory"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_split_is_stable_and_about_two_percent() {
        let paths: Vec<PathBuf> = (0..20_000)
            .map(|i| PathBuf::from(format!("pkg{}/mod{i}.py", i % 37)))
            .collect();
        let held = paths
            .iter()
            .filter(|p| split_of(p) == Split::HeldOut)
            .count();
        assert!((300..500).contains(&held), "{held} of 20000 held out");
        // Same path, same side, every time.
        assert!(paths.iter().all(|p| split_of(p) == split_of(&p.clone())));
        // FNV-1a of "a" (a published test vector) pins the hash itself.
        let mut h = Fnv::new();
        h.write(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
    }
}
