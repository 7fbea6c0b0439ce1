//! Disk images behind virtio-blk: raw files, and copy-on-write layers.
//!
//! A *layer* is a thin file over a read-only base image (raw or itself a
//! layer): blocks the guest wrote live in the layer, every other block is
//! read from the base. A snapshot freezes a disk's current image as a base
//! and gives the VM (and every fork restored from the snapshot) its own
//! layer on top, so N replicas share one base and pay only for what each
//! writes. Nothing is ever copied whole.
//!
//! ```text
//! 0      header (4 KiB): magic "CAPLAYER" | version u32 | block size u32
//!        | size u64 | base size u64 | base mtime ns u64 | base kind u32
//!        | base path len u32 | base path | CRC-32 of all of the above
//! 4 KiB  allocation bitmap: bit i set = block i lives in this file
//! data   block i at data + i * block size (the file is sparse)
//! ```
//!
//! Layer files are untrusted: every header field is checked, the base
//! chain is bounded in depth, and a base that changed since the layer was
//! made (size or modification time) is refused rather than read.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MAGIC: [u8; 8] = *b"CAPLAYER";
const VERSION: u32 = 1;
const HEADER_SIZE: u64 = 4096;
/// Copy-on-write granularity: a first write to a block copies the rest of
/// it up from the base.
pub const BLOCK_SIZE: u32 = 64 * 1024;
/// Longest base chain accepted (also what stops a layer that is its own
/// base).
pub const MAX_DEPTH: usize = 32;
const MAX_BASE_PATH: usize = 2048;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// What a disk file is. Always known from where it came from, never
/// guessed from its contents: the guest writes a raw disk's first bytes
/// and could otherwise make it look like a layer naming any host file as
/// its base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DiskKind {
    /// A raw image, as a user supplies it.
    Raw,
    /// A layer file Capsule made.
    Layer,
}

/// Most bytes of allocation bitmap a layer may have (a 32 TiB disk at
/// 64 KiB blocks): a header claiming more is refused before anything is
/// allocated.
const MAX_BITMAP: u64 = 64 << 20;

/// A disk image: a raw file or a layer over a base.
#[derive(Debug)]
pub enum DiskImage {
    Raw {
        file: File,
        path: PathBuf,
        size: u64,
    },
    Layer(Box<Layer>),
}

#[derive(Debug)]
pub struct Layer {
    file: File,
    path: PathBuf,
    base: DiskImage,
    block_size: u64,
    size: u64,
    bitmap: Vec<u8>,
    data_offset: u64,
}

/// What identifies a frozen image: its size and modification time (ns).
/// A layer refuses a base whose fingerprint differs from when it was
/// made; a snapshot refuses a disk that changed since it was taken.
pub fn fingerprint(path: &Path) -> io::Result<(u64, u64)> {
    let meta = std::fs::metadata(path)?;
    let mtime = (meta.mtime() as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(meta.mtime_nsec() as u64);
    Ok((meta.len(), mtime))
}

impl DiskImage {
    /// Opens `path` as an image of `kind`. A layer's base chain is always
    /// opened read-only.
    pub fn open(path: &Path, kind: DiskKind, writable: bool) -> io::Result<DiskImage> {
        Self::open_at_depth(path, kind, writable, 0)
    }

    fn open_at_depth(
        path: &Path,
        kind: DiskKind,
        writable: bool,
        depth: usize,
    ) -> io::Result<DiskImage> {
        if depth > MAX_DEPTH {
            return Err(invalid(format!(
                "{}: more than {MAX_DEPTH} layers deep (or a layer is its own base)",
                path.display()
            )));
        }
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        if kind == DiskKind::Layer {
            return Ok(DiskImage::Layer(Box::new(Layer::open(
                file,
                path.to_path_buf(),
                depth,
            )?)));
        }
        let size = file.metadata()?.len();
        Ok(DiskImage::Raw {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    pub fn kind(&self) -> DiskKind {
        match self {
            DiskImage::Raw { .. } => DiskKind::Raw,
            DiskImage::Layer(_) => DiskKind::Layer,
        }
    }

    /// How many files make up the image (1 for a raw image).
    pub fn depth(&self) -> usize {
        match self {
            DiskImage::Raw { .. } => 1,
            DiskImage::Layer(l) => 1 + l.base.depth(),
        }
    }

    /// The guest-visible size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            DiskImage::Raw { size, .. } => *size,
            DiskImage::Layer(l) => l.size,
        }
    }

    /// The file holding this image's top (writable) level.
    pub fn path(&self) -> &Path {
        match self {
            DiskImage::Raw { path, .. } => path,
            DiskImage::Layer(l) => &l.path,
        }
    }

    fn file(&self) -> &File {
        match self {
            DiskImage::Raw { file, .. } => file,
            DiskImage::Layer(l) => &l.file,
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "access past the end of the disk",
            )),
        }
    }

    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        match self {
            DiskImage::Raw { file, .. } => file.read_exact_at(buf, offset),
            DiskImage::Layer(l) => l.read_exact_at(buf, offset),
        }
    }

    pub fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        match self {
            DiskImage::Raw { file, .. } => file.write_all_at(buf, offset),
            DiskImage::Layer(l) => l.write_all_at(buf, offset),
        }
    }

    /// Makes written data durable (the top level only: bases never change).
    pub fn sync_data(&self) -> io::Result<()> {
        self.file().sync_data()
    }

    /// Freezes this image as the read-only base of a new, empty layer
    /// created at `top`, which becomes the image. From now on nothing
    /// writes the frozen files. On error the image is unchanged.
    pub fn push_layer(&mut self, top: &Path) -> io::Result<()> {
        let (file, data_offset, bitmap_len) = Layer::create_file(top, self)?;
        let placeholder = match self.file().try_clone() {
            Ok(f) => DiskImage::Raw {
                file: f,
                path: self.path().to_path_buf(),
                size: self.size(),
            },
            Err(e) => {
                let _ = std::fs::remove_file(top);
                return Err(e);
            }
        };
        let base = std::mem::replace(self, placeholder);
        *self = DiskImage::Layer(Box::new(Layer {
            file,
            path: top.to_path_buf(),
            block_size: u64::from(BLOCK_SIZE),
            size: base.size(),
            base,
            bitmap: vec![0; bitmap_len],
            data_offset,
        }));
        Ok(())
    }

    /// Gives this image's top file a second home at `dest` (a hard link,
    /// or a sparse copy across filesystems) and uses that path from now
    /// on: a snapshot keeps the layers it needs with it. The top must not
    /// be written meanwhile or after (it is about to be frozen).
    /// An existing `dest` is an error, never replaced: it may be some
    /// other image's base.
    pub fn relocate_top(&mut self, dest: &Path) -> io::Result<()> {
        match std::fs::hard_link(self.path(), dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
            Err(_) => self.copy_top_to(dest)?,
        }
        match self {
            DiskImage::Raw { path, .. } => *path = dest.to_path_buf(),
            DiskImage::Layer(l) => l.path = dest.to_path_buf(),
        }
        Ok(())
    }

    /// The image under this one's top layer, if it is a layer.
    pub fn base(&self) -> Option<&DiskImage> {
        match self {
            DiskImage::Raw { .. } => None,
            DiskImage::Layer(l) => Some(&l.base),
        }
    }

    /// Whether this image's top level is a layer file (as opposed to a raw
    /// image the user supplied).
    pub fn is_layer(&self) -> bool {
        matches!(self, DiskImage::Layer(_))
    }

    /// Copies this image's top level to `dest`, sparsely: for a layer only
    /// its header, bitmap and allocated blocks are written.
    pub fn copy_top_to(&self, dest: &Path) -> io::Result<()> {
        match self {
            DiskImage::Raw { .. } => std::fs::copy(self.path(), dest).map(|_| ()),
            DiskImage::Layer(l) => l.copy_to(dest),
        }
    }
}

impl Layer {
    /// Creates an empty layer file at `path` over `base`; returns it with
    /// its data offset and bitmap length.
    fn create_file(path: &Path, base: &DiskImage) -> io::Result<(File, u64, usize)> {
        let base_path = std::path::absolute(base.path())?;
        let base_path_bytes = base_path.as_os_str().as_encoded_bytes();
        if base_path_bytes.len() > MAX_BASE_PATH {
            return Err(invalid(format!(
                "base path {} is too long",
                base_path.display()
            )));
        }
        let size = base.size();
        let block_size = u64::from(BLOCK_SIZE);
        let bitmap_len = size.div_ceil(block_size).div_ceil(8);
        let data_offset = HEADER_SIZE + bitmap_len.div_ceil(4096) * 4096;
        let (base_size, base_mtime) = fingerprint(&base_path)?;

        let mut header = Vec::with_capacity(HEADER_SIZE as usize);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&BLOCK_SIZE.to_le_bytes());
        header.extend_from_slice(&size.to_le_bytes());
        header.extend_from_slice(&base_size.to_le_bytes());
        header.extend_from_slice(&base_mtime.to_le_bytes());
        let base_kind: u32 = match base.kind() {
            DiskKind::Raw => 0,
            DiskKind::Layer => 1,
        };
        header.extend_from_slice(&base_kind.to_le_bytes());
        header.extend_from_slice(&(base_path_bytes.len() as u32).to_le_bytes());
        header.extend_from_slice(base_path_bytes);
        let crc = crc32fast::hash(&header);
        header.extend_from_slice(&crc.to_le_bytes());

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let written = file
            .set_len(data_offset + size)
            .and_then(|()| file.write_all_at(&header, 0));
        if let Err(e) = written {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok((file, data_offset, bitmap_len as usize))
    }

    fn open(file: File, path: PathBuf, depth: usize) -> io::Result<Layer> {
        let bad = |what: &str| invalid(format!("{}: {what}", path.display()));
        let mut header = vec![0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|_| bad("truncated layer header"))?;
        let u32_at =
            |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at =
            |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(&format!(
                "layer format version {version} is not supported"
            )));
        }
        let block_size = u64::from(u32_at(12));
        let size = u64_at(16);
        let (base_size, base_mtime) = (u64_at(24), u64_at(32));
        let base_kind = match u32_at(40) {
            0 => DiskKind::Raw,
            1 => DiskKind::Layer,
            _ => return Err(bad("corrupt layer header (base kind)")),
        };
        let path_len = u32_at(44) as usize;
        if path_len == 0 || path_len > MAX_BASE_PATH {
            return Err(bad("corrupt layer header (base path length)"));
        }
        let crc_at = 48 + path_len;
        if crc32fast::hash(&header[..crc_at]) != u32_at(crc_at) {
            return Err(bad("corrupt layer header (checksum mismatch)"));
        }
        if !block_size.is_power_of_two() || !(4096..=(1 << 20)).contains(&block_size) {
            return Err(bad(&format!("unsupported block size {block_size}")));
        }
        if size == 0 || size % 512 != 0 || size > (1 << 50) {
            return Err(bad(&format!("unsupported disk size {size}")));
        }
        let bitmap_len = size.div_ceil(block_size).div_ceil(8);
        if bitmap_len > MAX_BITMAP {
            return Err(bad(&format!(
                "a {size}-byte disk in {block_size}-byte blocks needs too large an allocation map"
            )));
        }
        let data_offset = HEADER_SIZE + bitmap_len.div_ceil(4096) * 4096;
        if file.metadata()?.len() < data_offset {
            return Err(bad("truncated layer (allocation map)"));
        }
        let mut bitmap = vec![0u8; bitmap_len as usize];
        file.read_exact_at(&mut bitmap, HEADER_SIZE)?;

        let base_path = PathBuf::from(std::ffi::OsStr::from_bytes(&header[48..crc_at]));
        let base =
            DiskImage::open_at_depth(&base_path, base_kind, false, depth + 1).map_err(|e| {
                invalid(format!(
                    "{}: cannot open its base {}: {e}",
                    path.display(),
                    base_path.display()
                ))
            })?;
        if fingerprint(&base_path)? != (base_size, base_mtime) || base.size() != size {
            return Err(bad(&format!(
                "its base {} changed since the layer was made",
                base_path.display()
            )));
        }
        Ok(Layer {
            file,
            path,
            base,
            block_size,
            size,
            bitmap,
            data_offset,
        })
    }

    fn allocated(&self, block: u64) -> bool {
        self.bitmap
            .get((block / 8) as usize)
            .is_some_and(|byte| byte & (1 << (block % 8)) != 0)
    }

    fn block_len(&self, block: u64) -> u64 {
        self.block_size.min(self.size - block * self.block_size)
    }

    /// Reads runs of blocks from wherever they live, one call per run.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let here = self.allocated(pos / self.block_size);
            // Extend the run over following blocks in the same place.
            let mut end = ((pos / self.block_size) + 1) * self.block_size;
            while end < offset + buf.len() as u64 && self.allocated(end / self.block_size) == here {
                end += self.block_size;
            }
            let n = (end - pos).min((buf.len() - done) as u64) as usize;
            let chunk = &mut buf[done..done + n];
            if here {
                self.file.read_exact_at(chunk, self.data_offset + pos)?;
            } else {
                self.base.read_exact_at(chunk, pos)?;
            }
            done += n;
        }
        Ok(())
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / self.block_size;
            let start = block * self.block_size;
            let len = self.block_len(block);
            let n = ((start + len - pos) as usize).min(buf.len() - done);
            let data = &buf[done..done + n];
            if self.allocated(block) {
                self.file.write_all_at(data, self.data_offset + pos)?;
            } else {
                if pos == start && n as u64 == len {
                    self.file.write_all_at(data, self.data_offset + pos)?;
                } else {
                    // Copy the block up from the base, with the new bytes in.
                    let mut whole = vec![0u8; len as usize];
                    self.base.read_exact_at(&mut whole, start)?;
                    let at = (pos - start) as usize;
                    whole[at..at + n].copy_from_slice(data);
                    self.file.write_all_at(&whole, self.data_offset + start)?;
                }
                // The data first, then the map entry that points at it.
                let byte = (block / 8) as usize;
                self.bitmap[byte] |= 1 << (block % 8);
                self.file
                    .write_all_at(&self.bitmap[byte..=byte], HEADER_SIZE + byte as u64)?;
            }
            done += n;
        }
        Ok(())
    }

    fn copy_to(&self, dest: &Path) -> io::Result<()> {
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dest)?;
        out.set_len(self.data_offset + self.size)?;
        let mut meta = vec![0u8; self.data_offset as usize];
        self.file.read_exact_at(&mut meta, 0)?;
        out.write_all_at(&meta, 0)?;
        let mut block = vec![0u8; self.block_size as usize];
        for b in 0..self.size.div_ceil(self.block_size) {
            if self.allocated(b) {
                let len = self.block_len(b) as usize;
                let at = self.data_offset + b * self.block_size;
                self.file.read_exact_at(&mut block[..len], at)?;
                out.write_all_at(&block[..len], at)?;
            }
        }
        out.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(dir: &Path, name: &str, size: usize, fill: impl Fn(usize) -> u8) -> PathBuf {
        let path = dir.join(name);
        let data: Vec<u8> = (0..size).map(fill).collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    #[test]
    fn a_layer_reads_through_and_keeps_writes_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        let size = 5 * BLOCK_SIZE as usize + 4096; // a partial last block
        let base_path = raw(dir.path(), "base.img", size, |i| (i % 251) as u8);
        let base_before = std::fs::read(&base_path).unwrap();
        let mut expected = base_before.clone();

        let mut disk = DiskImage::open(&base_path, DiskKind::Raw, true).unwrap();
        let top = dir.path().join("top.layer");
        disk.push_layer(&top).unwrap();
        assert_eq!(disk.size(), size as u64);

        // Partial writes (copy-up), a whole block, a write across blocks,
        // and the partial last block.
        let writes: [(u64, usize); 4] = [
            (100, 10),
            (2 * BLOCK_SIZE as u64, BLOCK_SIZE as usize),
            (4 * BLOCK_SIZE as u64 - 7, 20),
            (size as u64 - 5, 5),
        ];
        for (n, (at, len)) in writes.into_iter().enumerate() {
            let data = vec![0xe0 + n as u8; len];
            disk.write_all_at(&data, at).unwrap();
            expected[at as usize..at as usize + len].copy_from_slice(&data);
        }
        let mut all = vec![0u8; size];
        disk.read_exact_at(&mut all, 0).unwrap();
        assert!(all == expected, "reads through the layer differ");
        assert!(
            std::fs::read(&base_path).unwrap() == base_before,
            "the base changed"
        );

        // Reopened from its file, the layer finds its base and its blocks.
        disk.sync_data().unwrap();
        drop(disk);
        let disk = DiskImage::open(&top, DiskKind::Layer, true).unwrap();
        assert!(disk.is_layer());
        let mut again = vec![0u8; size];
        disk.read_exact_at(&mut again, 0).unwrap();
        assert!(again == expected);

        // Bounds are checked.
        let mut one = [0u8; 1];
        assert!(disk.read_exact_at(&mut one, size as u64).is_err());

        // The file is thin: 3 copied-up/written blocks plus the last
        // partial one, not the whole disk.
        let used = std::fs::metadata(&top).unwrap().blocks() * 512;
        assert!(used < 6 * u64::from(BLOCK_SIZE), "layer uses {used} bytes");

        // A sparse copy reads the same.
        let copy = dir.path().join("copy.layer");
        disk.copy_top_to(&copy).unwrap();
        let copied = DiskImage::open(&copy, DiskKind::Layer, false).unwrap();
        let mut from_copy = vec![0u8; size];
        copied.read_exact_at(&mut from_copy, 0).unwrap();
        assert!(from_copy == expected);
    }

    #[test]
    fn layers_stack_and_siblings_do_not_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let size = 2 * BLOCK_SIZE as usize;
        let base_path = raw(dir.path(), "base.img", size, |_| b'b');
        let mut mid = DiskImage::open(&base_path, DiskKind::Raw, true).unwrap();
        mid.push_layer(&dir.path().join("mid.layer")).unwrap();
        mid.write_all_at(b"mid", 0).unwrap();
        let mid_path = mid.path().to_path_buf();
        drop(mid);
        let open_fork = |name: &str| {
            let mut d = DiskImage::open(&mid_path, DiskKind::Layer, false).unwrap();
            d.push_layer(&dir.path().join(name)).unwrap();
            d
        };
        let mut a = open_fork("a.layer");
        let mut b = open_fork("b.layer");
        a.write_all_at(b"AAA", 1).unwrap();
        b.write_all_at(b"BB", 4000).unwrap();
        let read = |d: &DiskImage, at: u64| {
            let mut buf = [0u8; 4];
            d.read_exact_at(&mut buf, at).unwrap();
            buf
        };
        assert_eq!(&read(&a, 0), b"mAAA");
        assert_eq!(&read(&b, 0), b"midb");
        assert_eq!(&read(&a, 4000), b"bbbb");
        assert_eq!(&read(&b, 4000), b"BBbb");
    }

    /// A raw one-block image of ones and an empty layer file over it.
    fn one_block_layer() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let base_path = raw(dir.path(), "base.img", BLOCK_SIZE as usize, |_| 1);
        let top = dir.path().join("top.layer");
        DiskImage::open(&base_path, DiskKind::Raw, true)
            .unwrap()
            .push_layer(&top)
            .unwrap();
        (dir, base_path, top)
    }

    /// Recomputes the header checksum of a layer file edited by a test.
    fn reseal(bytes: &mut [u8]) {
        let end = 48 + u32::from_le_bytes(bytes[44..48].try_into().unwrap()) as usize;
        let crc = crc32fast::hash(&bytes[..end]);
        bytes[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn corrupt_or_stale_layers_are_refused() {
        let (_dir, base_path, top) = one_block_layer();
        let good = std::fs::read(&top).unwrap();
        let reopen = |bytes: &[u8]| {
            std::fs::write(&top, bytes).unwrap();
            DiskImage::open(&top, DiskKind::Layer, false)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        // Any flipped header byte, and truncation.
        for at in (8..60).step_by(3) {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            let e = reopen(&bad);
            assert!(
                e.contains("corrupt") || e.contains("version"),
                "byte {at}: {e}"
            );
        }
        assert!(reopen(&good[..100]).contains("truncated"));
        // A base that changed under the layer.
        std::fs::write(&top, &good).unwrap();
        assert!(DiskImage::open(&top, DiskKind::Layer, false).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&base_path, vec![2u8; BLOCK_SIZE as usize]).unwrap();
        let e = DiskImage::open(&top, DiskKind::Layer, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("changed since the layer was made"), "{e}");
    }

    #[test]
    fn a_raw_disk_holding_a_layer_header_stays_raw() {
        // What a guest could write to its disk's first sector.
        let (_dir, _, top) = one_block_layer();
        let disk = DiskImage::open(&top, DiskKind::Raw, false).unwrap();
        assert_eq!(disk.kind(), DiskKind::Raw);
        let mut magic = [0u8; 8];
        disk.read_exact_at(&mut magic, 0).unwrap();
        assert_eq!(&magic, b"CAPLAYER", "read as the raw bytes it holds");
    }

    #[test]
    fn a_layer_claiming_a_huge_disk_is_refused_before_allocating() {
        let (_dir, _, top) = one_block_layer();
        let mut bytes = std::fs::read(&top).unwrap();
        bytes[12..16].copy_from_slice(&4096u32.to_le_bytes());
        bytes[16..24].copy_from_slice(&(1u64 << 50).to_le_bytes());
        reseal(&mut bytes);
        std::fs::write(&top, bytes).unwrap();
        let e = DiskImage::open(&top, DiskKind::Layer, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large an allocation map"), "{e}");
    }

    #[test]
    fn relocating_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = raw(dir.path(), "base.img", BLOCK_SIZE as usize, |_| 1);
        let mut disk = DiskImage::open(&base_path, DiskKind::Raw, true).unwrap();
        disk.push_layer(&dir.path().join("top.layer")).unwrap();
        let taken = dir.path().join("taken");
        std::fs::write(&taken, b"someone else's").unwrap();
        assert!(disk.relocate_top(&taken).is_err());
        assert_eq!(std::fs::read(&taken).unwrap(), b"someone else's");
        disk.relocate_top(&dir.path().join("kept.layer")).unwrap();
        assert_eq!(disk.path(), dir.path().join("kept.layer"));
    }

    #[test]
    fn a_layer_that_is_its_own_base_is_refused() {
        let (_dir, _, top) = one_block_layer();
        // Point the layer at itself (with a valid checksum).
        let mut bytes = std::fs::read(&top).unwrap();
        let top_abs = std::path::absolute(&top).unwrap();
        let p = top_abs.as_os_str().as_encoded_bytes();
        bytes[40..44].copy_from_slice(&1u32.to_le_bytes());
        bytes[44..48].copy_from_slice(&(p.len() as u32).to_le_bytes());
        bytes[48..48 + p.len()].copy_from_slice(p);
        reseal(&mut bytes);
        std::fs::write(&top, bytes).unwrap();
        let e = DiskImage::open(&top, DiskKind::Layer, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layers deep") || e.contains("changed"), "{e}");
    }
}
