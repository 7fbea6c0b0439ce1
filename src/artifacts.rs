//! Finding the guest kernel and initramfs.
//!
//! In order: an explicit path, the `CAPSULE_KERNEL` / `CAPSULE_INITRAMFS`
//! environment variables, `../capsule/` next to the executable (where
//! `make` puts them, so `target/release/capsule` finds `target/capsule/`),
//! and `${XDG_DATA_HOME:-~/.local/share}/capsule/`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

pub const KERNEL_FILE: &str = "vmlinux";
pub const INITRAMFS_FILE: &str = "initramfs.cpio";

fn candidates(file: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        // target/release/capsule -> target/capsule; target/release/deps/x -> target/capsule
        dirs.push(dir.join("../capsule"));
        dirs.push(dir.join("../../capsule"));
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    if let Some(data) = data {
        dirs.push(data.join("capsule"));
    }
    dirs.into_iter().map(|d| d.join(file)).collect()
}

/// Resolves one artifact.
pub fn find(explicit: Option<&Path>, env_var: &str, file: &str) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("{} does not exist", p.display());
        }
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{env_var}={} does not exist", p.display());
        }
        return Ok(p);
    }
    let tried = candidates(file);
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return Ok(found.canonicalize().unwrap_or_else(|_| found.clone()));
    }
    let list: Vec<String> = tried.iter().map(|p| format!("  {}", p.display())).collect();
    bail!(
        "no guest {file} found. Build it with `make artifacts`, set {env_var}, or pass it explicitly. Looked in:\n{}",
        list.join("\n")
    )
}
