//! `capsule cp` and `capsule files`: files in a daemon sandbox, named
//! `ID:/path`, through the API's file endpoints. Transfers stream (any
//! size, with a progress bar on a terminal); a download is written beside
//! its target and renamed into place, so a transfer cut short never
//! leaves half a file.

use std::io::IsTerminal;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::api::files::{EntryInfo, Listing, WatchLine};
use crate::client::{encode, ApiClient, ApiRefusal};

/// `ID:/path`: a path in a sandbox.
#[derive(Clone, Debug)]
pub struct Remote {
    pub id: String,
    pub path: String,
}

impl Remote {
    /// `ID:/path`, or `None` for a local path.
    fn parse(s: &str) -> Option<Remote> {
        let (id, path) = s.split_once(':')?;
        if id.is_empty() || id.contains('/') || !path.starts_with('/') {
            return None;
        }
        Some(Remote {
            id: id.to_string(),
            path: path.to_string(),
        })
    }

    fn require(s: &str) -> Result<Remote> {
        Remote::parse(s).with_context(|| {
            format!("{s:?} does not name a file in a sandbox: write it ID:/absolute/path")
        })
    }

    fn url(&self, endpoint: &str, extra: &str) -> String {
        format!(
            "/v1/sandboxes/{}/files{endpoint}?path={}{extra}",
            encode(&self.id),
            encode(&self.path)
        )
    }

    fn join(&self, name: &str) -> Remote {
        Remote {
            id: self.id.clone(),
            path: format!("{}/{name}", self.path.trim_end_matches('/')),
        }
    }
}

#[derive(Args, Debug)]
pub struct CpArgs {
    /// What to copy: a local file (`-` for stdin) or `ID:/path`.
    pub source: String,
    /// Where to: `ID:/path` (a directory there keeps the name) or a local
    /// path (`-` for stdout).
    pub dest: String,
    /// Create missing parent directories in the sandbox.
    #[arg(short, long)]
    pub parents: bool,
    /// Copy a directory and everything in it (as a tar stream: modes,
    /// times and symlinks kept). Into an existing directory it keeps its
    /// name, as `cp -r` does.
    #[arg(short, long)]
    pub recursive: bool,
    /// Print what was copied as JSON, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum FilesCommand {
    /// List a directory in a sandbox.
    Ls {
        /// `ID:/path`
        target: String,
        /// At most this many entries (default and most 100000).
        #[arg(long)]
        limit: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Show what a path in a sandbox is.
    Stat {
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// Make a directory in a sandbox.
    Mkdir {
        target: String,
        /// Make missing parents too (an existing directory is no error).
        #[arg(short, long)]
        parents: bool,
        /// Permission bits in octal (default 755).
        #[arg(long)]
        mode: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a file, or a directory with --recursive.
    Rm {
        target: String,
        #[arg(short, long)]
        recursive: bool,
    },
    /// Print what happens under a directory as it happens: create,
    /// write, remove, rename_from, rename_to, chmod. Runs until
    /// interrupted or the directory goes.
    Watch {
        target: String,
        /// Directories under it too, including ones made later.
        #[arg(short, long)]
        recursive: bool,
        /// One JSON object per line, as the API sends them.
        #[arg(long)]
        json: bool,
    },
    /// Rename a path inside a sandbox.
    Mv {
        /// `ID:/from`
        from: String,
        /// `/to` or `ID:/to` (the same sandbox)
        to: String,
        #[arg(long)]
        json: bool,
    },
}

fn bar(json: bool, len: Option<u64>, what: &str) -> Option<ProgressBar> {
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    let template = "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}";
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    Some(bar)
}

fn stat(client: &ApiClient, remote: &Remote) -> Result<Option<EntryInfo>> {
    match client.call::<EntryInfo>(Method::GET, &remote.url("/stat", ""), None) {
        Ok(info) => Ok(Some(info)),
        Err(e)
            if e.downcast_ref::<ApiRefusal>()
                .is_some_and(|r| r.code == "file_not_found") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

pub fn cp(args: CpArgs) -> Result<u8> {
    let client = ApiClient::new()?;
    match (Remote::parse(&args.source), Remote::parse(&args.dest)) {
        (None, Some(dest)) if args.recursive => upload_tree(&client, &args, dest),
        (Some(source), None) if args.recursive => download_tree(&client, &args, source),
        (None, Some(dest)) => upload(&client, &args, dest),
        (Some(source), None) => download(&client, &args, source),
        (Some(_), Some(_)) => {
            bail!("copy between sandboxes is not supported: one side must be local")
        }
        (None, None) => bail!("neither side names a sandbox: write one as ID:/absolute/path"),
    }
}

fn upload(client: &ApiClient, args: &CpArgs, mut dest: Remote) -> Result<u8> {
    let (source, meta): (Box<dyn std::io::Read + Send>, Option<std::fs::Metadata>) =
        if args.source == "-" {
            (Box::new(std::io::stdin()), None)
        } else {
            let path = Path::new(&args.source);
            let meta = std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if meta.is_dir() {
                bail!("{} is a directory: copy it with -r", path.display());
            }
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            (Box::new(file), Some(meta))
        };
    if dest.path.ends_with('/') || stat(client, &dest)?.is_some_and(|i| i.kind == "dir") {
        let name = Path::new(&args.source)
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|_| args.source != "-")
            .context("a directory in the sandbox needs a file name to copy stdin to")?;
        dest = dest.join(name);
    }
    let mut extra = String::new();
    if let Some(meta) = &meta {
        // What `cp -p` keeps: mode and modification time.
        extra += &format!("&mode={:o}", meta.permissions().mode() & 0o7777);
        let mtime_ms = meta.mtime().saturating_mul(1000) + meta.mtime_nsec() / 1_000_000;
        if mtime_ms >= 0 {
            extra += &format!("&mtime_ms={mtime_ms}");
        }
    }
    if args.parents {
        extra += "&parents=true";
    }
    let progress = bar(args.json, meta.as_ref().map(|m| m.len()), "upload");
    let shown = progress.clone();
    let info: EntryInfo = client.upload(
        &dest.url("", &extra),
        source,
        Box::new(move |n| {
            if let Some(bar) = &shown {
                bar.set_position(n);
            }
        }),
    )?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if args.json {
        print_json(&json!({
            "sandbox": dest.id, "path": dest.path, "bytes": info.size, "entry": info
        }))?;
    } else {
        eprintln!("capsule: {} bytes to {}:{}", info.size, dest.id, dest.path);
    }
    Ok(0)
}

fn download(client: &ApiClient, args: &CpArgs, source: Remote) -> Result<u8> {
    let info = stat(client, &source)?
        .with_context(|| format!("{}:{}: no such file", source.id, source.path))?;
    if info.kind == "dir" {
        bail!(
            "{}:{} is a directory: copy it with -r",
            source.id,
            source.path
        );
    }
    let progress = std::cell::OnceCell::new();
    let mut size = |len: Option<u64>| {
        if let Some(b) = bar(args.json, len, "download") {
            let _ = progress.set(b);
        }
    };
    let url = source.url("", "");
    let total;
    let mut dest = PathBuf::from(&args.dest);
    if args.dest == "-" {
        let mut out = std::io::stdout().lock();
        total = client.download(&url, &mut out, &mut size, &mut |_| {})?;
    } else {
        if dest.is_dir() {
            dest = dest.join(&info.name);
        }
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Removed if dropped before it is renamed into place.
        let mut file = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        let mut shown = |n: u64| {
            if let Some(bar) = progress.get() {
                bar.set_position(n);
            }
        };
        total = client.download(&url, file.as_file_mut(), &mut size, &mut shown)?;
        let _ = file
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(info.mode & 0o7777));
        file.persist(&dest)
            .with_context(|| format!("cannot write {}", dest.display()))?;
    }
    if let Some(bar) = progress.get() {
        bar.finish_and_clear();
    }
    if args.json {
        print_json(&json!({ "path": dest, "bytes": total }))?;
    } else if args.dest != "-" {
        eprintln!("capsule: {total} bytes to {}", dest.display());
    }
    Ok(0)
}

/// The last component of a path, for a copy into a directory.
fn base_name(path: &str) -> Result<&str> {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{path:?} names no file or directory"))
}

fn upload_tree(client: &ApiClient, args: &CpArgs, mut dest: Remote) -> Result<u8> {
    let root = PathBuf::from(&args.source);
    if !root.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    if stat(client, &dest)?.is_some_and(|i| i.kind == "dir") {
        dest = dest.join(base_name(&args.source)?);
    }
    // The archive is made as it is sent: a pipe between a thread that
    // writes it and the request body that reads it.
    let (reader, writer) = std::io::pipe().context("making a pipe")?;
    let walked = root.clone();
    let builder = std::thread::spawn(move || -> std::io::Result<()> {
        let mut tar = tar::Builder::new(writer);
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        tar.append_dir_all(".", &walked)?;
        tar.finish()
    });
    let progress = bar(args.json, None, "upload");
    let shown = progress.clone();
    let sent = client.upload::<EntryInfo>(
        &dest.url("/archive", ""),
        Box::new(reader),
        Box::new(move |n| {
            if let Some(bar) = &shown {
                bar.set_position(n);
            }
        }),
    );
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let built = builder
        .join()
        .map_err(|_| anyhow::anyhow!("the archive's thread failed"))?;
    let info = match (sent, built) {
        (Ok(info), Ok(())) => info,
        (_, Err(e)) => bail!(
            "reading {} failed ({e}); {}:{} may hold part of it",
            root.display(),
            dest.id,
            dest.path
        ),
        (Err(e), Ok(())) => return Err(e),
    };
    if args.json {
        print_json(&json!({ "sandbox": dest.id, "path": dest.path, "entry": info }))?;
    } else {
        eprintln!("capsule: {} to {}:{}", root.display(), dest.id, dest.path);
    }
    Ok(0)
}

fn download_tree(client: &ApiClient, args: &CpArgs, source: Remote) -> Result<u8> {
    let mut dest = PathBuf::from(&args.dest);
    if dest.is_dir() {
        dest = dest.join(base_name(&source.path)?);
    }
    std::fs::create_dir_all(&dest).with_context(|| format!("cannot make {}", dest.display()))?;
    let (reader, mut writer) = std::io::pipe().context("making a pipe")?;
    let target = dest.clone();
    let unpacker = std::thread::spawn(move || -> std::io::Result<()> {
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        archive.unpack(&target)
    });
    let progress = bar(args.json, None, "download");
    let mut shown = |n: u64| {
        if let Some(bar) = &progress {
            bar.set_position(n);
        }
    };
    let got = client.download(
        &source.url("/archive", ""),
        &mut writer,
        &mut |_| {},
        &mut shown,
    );
    drop(writer);
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }
    let unpacked = unpacker
        .join()
        .map_err(|_| anyhow::anyhow!("the unpacking thread failed"))?;
    // An unpacking that failed stops the download too: its error says why.
    unpacked.with_context(|| format!("unpacking into {}", dest.display()))?;
    let total = got?;
    if args.json {
        print_json(&json!({ "path": dest, "bytes": total }))?;
    } else {
        eprintln!(
            "capsule: {}:{} to {}",
            source.id,
            source.path,
            dest.display()
        );
    }
    Ok(0)
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_entry(e: &EntryInfo) {
    println!(
        "{:<7} {:04o} {:>5}:{:<5} {:>12}  {}  {}{}",
        e.kind,
        e.mode,
        e.uid,
        e.gid,
        e.size,
        e.modified_at,
        e.name,
        e.symlink_target
            .as_ref()
            .map(|t| format!(" -> {t}"))
            .unwrap_or_default()
    );
}

pub fn files(command: FilesCommand) -> Result<u8> {
    let client = ApiClient::new()?;
    match command {
        FilesCommand::Ls {
            target,
            limit,
            json,
        } => {
            let remote = Remote::require(&target)?;
            let extra = limit.map(|n| format!("&limit={n}")).unwrap_or_default();
            let listing: Listing = client.call(Method::GET, &remote.url("/list", &extra), None)?;
            if json {
                print_json(&listing)?;
            } else {
                listing.entries.iter().for_each(print_entry);
                if listing.truncated {
                    eprintln!("capsule: more entries than shown (see --limit)");
                }
            }
        }
        FilesCommand::Stat { target, json } => {
            let remote = Remote::require(&target)?;
            let info: EntryInfo = client.call(Method::GET, &remote.url("/stat", ""), None)?;
            if json {
                print_json(&info)?;
            } else {
                print_entry(&info);
            }
        }
        FilesCommand::Mkdir {
            target,
            parents,
            mode,
            json,
        } => {
            let remote = Remote::require(&target)?;
            let body = json!({ "path": remote.path, "parents": parents, "mode": mode });
            let info: EntryInfo = client.call(
                Method::POST,
                &format!("/v1/sandboxes/{}/files/mkdir", encode(&remote.id)),
                Some(body),
            )?;
            if json {
                print_json(&info)?;
            }
        }
        FilesCommand::Rm { target, recursive } => {
            let remote = Remote::require(&target)?;
            let extra = if recursive { "&recursive=true" } else { "" };
            client.delete(&remote.url("", extra))?;
        }
        FilesCommand::Watch {
            target,
            recursive,
            json,
        } => {
            let remote = Remote::require(&target)?;
            let extra = if recursive { "&recursive=true" } else { "" };
            let mut ended = None;
            client.stream_lines(Method::GET, &remote.url("/watch", extra), None, |line| {
                let event: WatchLine =
                    serde_json::from_slice(line).context("the daemon sent a bad watch line")?;
                if event.kind == "error" {
                    ended = Some(format!(
                        "{} ({})",
                        event.message.unwrap_or_default(),
                        event.code.unwrap_or_default()
                    ));
                }
                if json {
                    println!("{}", String::from_utf8_lossy(line));
                } else if event.kind != "error" {
                    let slash = if event.dir { "/" } else { "" };
                    println!(
                        "{:<11} {}{slash}",
                        event.kind,
                        event.path.unwrap_or_default()
                    );
                }
                use std::io::Write;
                std::io::stdout().flush()?;
                Ok(())
            })?;
            if let Some(why) = ended {
                bail!("the watch ended: {why}");
            }
        }
        FilesCommand::Mv { from, to, json } => {
            let from = Remote::require(&from)?;
            let to = match Remote::parse(&to) {
                Some(r) if r.id != from.id => bail!("mv works inside one sandbox"),
                Some(r) => r.path,
                None if to.starts_with('/') => to,
                None => bail!("{to:?}: give an absolute path in the sandbox"),
            };
            let info: EntryInfo = client.call(
                Method::POST,
                &format!("/v1/sandboxes/{}/files/rename", encode(&from.id)),
                Some(json!({ "from": from.path, "to": to })),
            )?;
            if json {
                print_json(&info)?;
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::Remote;

    #[test]
    fn remote_paths_are_told_from_local_ones() {
        let r = Remote::parse("sb-abc:/work/a.txt").unwrap();
        assert_eq!((r.id.as_str(), r.path.as_str()), ("sb-abc", "/work/a.txt"));
        assert!(Remote::parse("./a:b").is_none());
        assert!(Remote::parse("a.txt").is_none());
        assert!(Remote::parse("sb-abc:relative").is_none());
        assert!(Remote::parse(":/x").is_none());
        assert_eq!(Remote::parse("sb-a:/d/").unwrap().join("f").path, "/d/f");
        let url = Remote::parse("sb-a:/a b&c").unwrap().url("/stat", "");
        assert_eq!(url, "/v1/sandboxes/sb-a/files/stat?path=%2Fa%20b%26c");
    }
}
