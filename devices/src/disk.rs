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
//!        | size u64 | layer id [16] | base kind u32 | base id [16]
//!        | base size u64 | base mtime ns u64 | base name len u32
//!        | base name | CRC-32 of all of the above
//! 4 KiB  allocation bitmap: bit i set = block i lives in this file
//! data   block i at data + i * block size (the file is sparse)
//! ```
//!
//! A layer never opens anything by itself: whoever opens it hands it the
//! base it must sit on, and the layer checks that base is the one it was
//! made over (a layer base by its random id, a raw base by its size and
//! modification time). So a layer file, which may come from a snapshot
//! someone else made, cannot make the VMM open any other file. The base
//! name in the header is a hint for messages only. Every header field is
//! checked, and chains are bounded in depth.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MAGIC: [u8; 8] = *b"CAPLAYER";
const VERSION: u32 = 2;
const HEADER_SIZE: u64 = 4096;
/// Copy-on-write granularity: a first write to a block copies the rest of
/// it up from the base.
pub const BLOCK_SIZE: u32 = 64 * 1024;
/// Longest chain of layers over a raw image.
pub const MAX_DEPTH: usize = 32;
const MAX_BASE_NAME: usize = 255;
/// Where the header's fields sit.
const AT_LAYER_ID: usize = 24;
const AT_BASE_KIND: usize = 40;
const AT_BASE_ID: usize = 44;
const AT_BASE_SIZE: usize = 60;
const AT_BASE_MTIME: usize = 68;
const AT_NAME_LEN: usize = 76;
const AT_NAME: usize = 80;

/// A layer's identity: random, made with the layer, kept by copies.
pub type LayerId = [u8; 16];

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Most bytes of allocation bitmap a layer may have (a 32 TiB disk at
/// 64 KiB blocks): a header claiming more is refused before anything is
/// allocated.
const MAX_BITMAP: u64 = 64 << 20;

/// A disk image: a raw file or a layer over a base. Which one a file is
/// is known from where it came from (`open_raw` or `open_layer`), never
/// guessed from its contents: the guest writes a raw disk's first bytes
/// and could otherwise make it look like a layer.
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
    id: LayerId,
    base: DiskImage,
    block_size: u64,
    size: u64,
    bitmap: Vec<u8>,
    data_offset: u64,
}

/// What identifies a raw image: its size and modification time (ns). A
/// layer refuses a raw base whose fingerprint differs from when it was
/// made; a snapshot refuses a disk that changed since it was taken.
pub fn fingerprint(path: &Path) -> io::Result<(u64, u64)> {
    Ok(fingerprint_of(&std::fs::metadata(path)?))
}

/// [`fingerprint`] of a file already open.
pub fn fingerprint_of_file(file: &File) -> io::Result<(u64, u64)> {
    Ok(fingerprint_of(&file.metadata()?))
}

fn fingerprint_of(meta: &std::fs::Metadata) -> (u64, u64) {
    let mtime = (meta.mtime() as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(meta.mtime_nsec() as u64);
    (meta.len(), mtime)
}

fn random_id() -> io::Result<LayerId> {
    use std::io::Read;
    let mut id = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut id)?;
    Ok(id)
}

/// Opens a file Capsule made (a layer or a snapshot's file, maybe from
/// someone else's snapshot): never through a symlink, and only a regular
/// file.
pub fn open_regular(path: &Path, writable: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(invalid(format!("{} is not a regular file", path.display())));
    }
    Ok(file)
}

impl DiskImage {
    /// Opens a raw image the user named.
    pub fn open_raw(path: &Path, writable: bool) -> io::Result<DiskImage> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        DiskImage::raw(file, path)
    }

    /// A raw image already open, called `name` in messages.
    pub fn raw(file: File, name: &Path) -> io::Result<DiskImage> {
        let size = file.metadata()?.len();
        Ok(DiskImage::Raw {
            file,
            path: name.to_path_buf(),
            size,
        })
    }

    /// Opens the layer file at `path` over `base`, which must be the image
    /// the layer was made over.
    pub fn open_layer(path: &Path, base: DiskImage, writable: bool) -> io::Result<DiskImage> {
        if base.depth() > MAX_DEPTH {
            return Err(invalid(format!(
                "{}: more than {MAX_DEPTH} layers deep",
                path.display()
            )));
        }
        let file = open_regular(path, writable)?;
        Ok(DiskImage::Layer(Box::new(Layer::open(
            file,
            path.to_path_buf(),
            base,
        )?)))
    }

    /// Opens a raw image and the layers over it, bottom first. Only the
    /// top is writable, and only if `writable`.
    pub fn open_chain(raw: &Path, layers: &[PathBuf], writable: bool) -> io::Result<DiskImage> {
        let raw = DiskImage::open_raw(raw, writable && layers.is_empty())?;
        DiskImage::open_chain_over(raw, layers, writable)
    }

    /// The layers over `raw` (an image already open), bottom first.
    pub fn open_chain_over(
        raw: DiskImage,
        layers: &[PathBuf],
        writable: bool,
    ) -> io::Result<DiskImage> {
        let mut image = raw;
        for (i, layer) in layers.iter().enumerate() {
            let top = i + 1 == layers.len();
            image = DiskImage::open_layer(layer, image, writable && top)?;
        }
        Ok(image)
    }

    /// The file of a raw image (not a layer), whose bytes are the disk's
    /// at the same offsets.
    pub fn raw_file(&self) -> Option<&File> {
        match self {
            DiskImage::Raw { file, .. } => Some(file),
            DiskImage::Layer(_) => None,
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

    /// The raw image at the bottom of the chain.
    pub fn raw_base(&self) -> &DiskImage {
        match self {
            DiskImage::Raw { .. } => self,
            DiskImage::Layer(l) => l.base.raw_base(),
        }
    }

    /// The fingerprint of the raw image at the bottom, from its open file.
    pub fn raw_fingerprint(&self) -> io::Result<(u64, u64)> {
        Ok(fingerprint_of(&self.raw_base().file().metadata()?))
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
        let (file, id, data_offset, bitmap_len) = Layer::create_file(top, self)?;
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
            id,
            block_size: u64::from(BLOCK_SIZE),
            size: base.size(),
            base,
            bitmap: vec![0; bitmap_len],
            data_offset,
        }));
        Ok(())
    }

    /// Gives every layer file of the chain a home in `dir` (a hard link,
    /// or a sparse copy across filesystems), named by `name(j)` for the
    /// j-th layer from the bottom, and uses those files from now on: a
    /// snapshot keeps the layers it needs with it. With `skip_top`, the
    /// top layer (the one the VM writes) stays where it is. Returns the
    /// names, bottom first. The layers moved must not be written again.
    /// An existing destination is an error, never replaced.
    pub fn keep_layers_in(
        &mut self,
        dir: &Path,
        skip_top: bool,
        name: &dyn Fn(usize) -> String,
    ) -> io::Result<Vec<String>> {
        match self {
            DiskImage::Raw { .. } => Ok(Vec::new()),
            DiskImage::Layer(l) => {
                let mut names = l.base.keep_layers_in(dir, false, name)?;
                if !skip_top {
                    let file_name = name(names.len());
                    l.relocate(&dir.join(&file_name))?;
                    names.push(file_name);
                }
                Ok(names)
            }
        }
    }
}

impl Layer {
    /// Creates an empty layer file at `path` over `base`; returns it with
    /// its id, data offset and bitmap length.
    fn create_file(path: &Path, base: &DiskImage) -> io::Result<(File, LayerId, u64, usize)> {
        let name = base
            .path()
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        let name = &name[..name.len().min(MAX_BASE_NAME)];
        let size = base.size();
        let block_size = u64::from(BLOCK_SIZE);
        let bitmap_len = size.div_ceil(block_size).div_ceil(8);
        let data_offset = HEADER_SIZE + bitmap_len.div_ceil(4096) * 4096;
        let id = random_id()?;
        let (base_kind, base_id, (base_size, base_mtime)) = match base {
            DiskImage::Raw { file, .. } => (0u32, [0u8; 16], fingerprint_of(&file.metadata()?)),
            DiskImage::Layer(l) => (1u32, l.id, (l.size, 0)),
        };

        let mut header = Vec::with_capacity(HEADER_SIZE as usize);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&BLOCK_SIZE.to_le_bytes());
        header.extend_from_slice(&size.to_le_bytes());
        header.extend_from_slice(&id);
        header.extend_from_slice(&base_kind.to_le_bytes());
        header.extend_from_slice(&base_id);
        header.extend_from_slice(&base_size.to_le_bytes());
        header.extend_from_slice(&base_mtime.to_le_bytes());
        header.extend_from_slice(&(name.len() as u32).to_le_bytes());
        header.extend_from_slice(name);
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
        Ok((file, id, data_offset, bitmap_len as usize))
    }

    fn open(file: File, path: PathBuf, base: DiskImage) -> io::Result<Layer> {
        let bad = |what: &str| invalid(format!("{}: {what}", path.display()));
        let mut header = vec![0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|_| bad("truncated layer header"))?;
        let u32_at =
            |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at =
            |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
        let id_at = |at: usize| -> LayerId { header[at..at + 16].try_into().unwrap_or([0; 16]) };
        if header[..8] != MAGIC {
            return Err(bad("not a Capsule layer (bad magic)"));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(&format!(
                "layer format version {version} is not supported"
            )));
        }
        let name_len = u32_at(AT_NAME_LEN) as usize;
        if name_len > MAX_BASE_NAME {
            return Err(bad("corrupt layer header (base name length)"));
        }
        let crc_at = AT_NAME + name_len;
        if crc32fast::hash(&header[..crc_at]) != u32_at(crc_at) {
            return Err(bad("corrupt layer header (checksum mismatch)"));
        }
        let block_size = u64::from(u32_at(12));
        let size = u64_at(16);
        if !block_size.is_power_of_two() || !(4096..=(1 << 20)).contains(&block_size) {
            return Err(bad(&format!("unsupported block size {block_size}")));
        }
        if size == 0 || size % 512 != 0 || size > (1 << 50) {
            return Err(bad(&format!("unsupported disk size {size}")));
        }
        let base_name = String::from_utf8_lossy(&header[AT_NAME..crc_at]).into_owned();
        // The base handed to us must be the one this layer was made over.
        let matches = match (u32_at(AT_BASE_KIND), &base) {
            (0, DiskImage::Raw { file, .. }) => {
                fingerprint_of(&file.metadata()?) == (u64_at(AT_BASE_SIZE), u64_at(AT_BASE_MTIME))
            }
            (1, DiskImage::Layer(l)) => l.id == id_at(AT_BASE_ID),
            (0 | 1, _) => false,
            _ => return Err(bad("corrupt layer header (base kind)")),
        };
        if !matches || base.size() != size {
            return Err(bad(&format!(
                "its base {} is not the image it was made over (another disk, a layer of \
                 another chain, or a raw image that changed since; it was made over {base_name:?})",
                base.path().display()
            )));
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
        Ok(Layer {
            file,
            path,
            id: id_at(AT_LAYER_ID),
            base,
            block_size,
            size,
            bitmap,
            data_offset,
        })
    }

    /// Keeps this layer's file at `dest` too (a hard link, or a sparse copy
    /// across filesystems) and uses that path from now on.
    fn relocate(&mut self, dest: &Path) -> io::Result<()> {
        match std::fs::hard_link(&self.path, dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
            Err(_) => self.copy_to(dest)?,
        }
        self.path = dest.to_path_buf();
        Ok(())
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

    fn over_raw(base: &Path, layer: &Path, writable: bool) -> io::Result<DiskImage> {
        DiskImage::open_layer(layer, DiskImage::open_raw(base, false)?, writable)
    }

    #[test]
    fn a_layer_reads_through_and_keeps_writes_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        let size = 5 * BLOCK_SIZE as usize + 4096; // a partial last block
        let base_path = raw(dir.path(), "base.img", size, |i| (i % 251) as u8);
        let base_before = std::fs::read(&base_path).unwrap();
        let mut expected = base_before.clone();

        let mut disk = DiskImage::open_raw(&base_path, true).unwrap();
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

        // Reopened from its file over its base, the layer has its blocks.
        disk.sync_data().unwrap();
        drop(disk);
        let mut disk = over_raw(&base_path, &top, true).unwrap();
        assert!(matches!(disk, DiskImage::Layer(_)));
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

        // Kept elsewhere (a link, or a copy), it reads the same.
        let elsewhere = tempfile::tempdir().unwrap();
        let names = disk
            .keep_layers_in(elsewhere.path(), false, &|j| format!("disk0.{j}.layer"))
            .unwrap();
        assert_eq!(names, ["disk0.0.layer"]);
        drop(disk);
        let kept = over_raw(&base_path, &elsewhere.path().join(&names[0]), false).unwrap();
        let mut from_kept = vec![0u8; size];
        kept.read_exact_at(&mut from_kept, 0).unwrap();
        assert!(from_kept == expected);
        let mut copy = kept;
        if let DiskImage::Layer(l) = &mut copy {
            let dest = elsewhere.path().join("copy.layer");
            l.copy_to(&dest).unwrap();
            let copied = over_raw(&base_path, &dest, false).unwrap();
            let mut from_copy = vec![0u8; size];
            copied.read_exact_at(&mut from_copy, 0).unwrap();
            assert!(from_copy == expected, "a sparse copy reads the same");
        }
    }

    #[test]
    fn layers_stack_and_siblings_do_not_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let size = 2 * BLOCK_SIZE as usize;
        let base_path = raw(dir.path(), "base.img", size, |_| b'b');
        let mut mid = DiskImage::open_raw(&base_path, true).unwrap();
        mid.push_layer(&dir.path().join("mid.layer")).unwrap();
        mid.write_all_at(b"mid", 0).unwrap();
        let mid_path = mid.path().to_path_buf();
        drop(mid);
        let open_fork = |name: &str| {
            let mut d =
                DiskImage::open_chain(&base_path, std::slice::from_ref(&mid_path), false).unwrap();
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
        assert_eq!(a.depth(), 3);
        // The whole chain under a, kept elsewhere by name, opens again.
        let kept = tempfile::tempdir().unwrap();
        let names = a
            .keep_layers_in(kept.path(), true, &|j| format!("disk0.{j}.layer"))
            .unwrap();
        assert_eq!(names, ["disk0.0.layer"], "the top stays where it is");
    }

    /// A raw one-block image of ones and an empty layer file over it.
    fn one_block_layer() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let base_path = raw(dir.path(), "base.img", BLOCK_SIZE as usize, |_| 1);
        let top = dir.path().join("top.layer");
        DiskImage::open_raw(&base_path, true)
            .unwrap()
            .push_layer(&top)
            .unwrap();
        (dir, base_path, top)
    }

    /// Recomputes the header checksum of a layer file edited by a test.
    fn reseal(bytes: &mut [u8]) {
        let end =
            AT_NAME + u32::from_le_bytes(bytes[AT_NAME_LEN..AT_NAME].try_into().unwrap()) as usize;
        let crc = crc32fast::hash(&bytes[..end]);
        bytes[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn corrupt_or_stale_layers_are_refused() {
        let (_dir, base_path, top) = one_block_layer();
        let good = std::fs::read(&top).unwrap();
        let reopen = |bytes: &[u8]| {
            std::fs::write(&top, bytes).unwrap();
            over_raw(&base_path, &top, false)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        // Any flipped header byte, and truncation.
        for at in 0..AT_NAME + 8 {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            let e = reopen(&bad);
            assert!(
                e.contains("corrupt") || e.contains("version") || e.contains("magic"),
                "byte {at}: {e}"
            );
        }
        assert!(reopen(&good[..100]).contains("truncated"));
        // A raw base that changed under the layer.
        std::fs::write(&top, &good).unwrap();
        assert!(over_raw(&base_path, &top, false).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&base_path, vec![2u8; BLOCK_SIZE as usize]).unwrap();
        let e = over_raw(&base_path, &top, false).unwrap_err().to_string();
        assert!(e.contains("is not the image it was made over"), "{e}");
    }

    #[test]
    fn a_layer_over_another_base_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let size = BLOCK_SIZE as usize;
        let a = raw(dir.path(), "a.img", size, |_| 1);
        let b = raw(dir.path(), "b.img", size, |_| 2);
        // Raw images are told apart by size and modification time: give b
        // another time (two files written at once can share one).
        std::fs::File::options()
            .write(true)
            .open(&b)
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1))
            .unwrap();
        let mut over_a = DiskImage::open_raw(&a, true).unwrap();
        over_a.push_layer(&dir.path().join("x.layer")).unwrap();
        let mut over_x = over_a;
        over_x.push_layer(&dir.path().join("y.layer")).unwrap();
        drop(over_x);
        // A raw image of the same size is not the one.
        let e = over_raw(&b, &dir.path().join("x.layer"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not the image it was made over"), "{e}");
        // A layer of another chain is not the one either.
        let mut other = DiskImage::open_raw(&a, true).unwrap();
        other.push_layer(&dir.path().join("z.layer")).unwrap();
        let e = DiskImage::open_layer(&dir.path().join("y.layer"), other, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not the image it was made over"), "{e}");
        // The right chain opens.
        DiskImage::open_chain(
            &a,
            &[dir.path().join("x.layer"), dir.path().join("y.layer")],
            true,
        )
        .unwrap();
    }

    #[test]
    fn a_layer_file_that_is_a_link_is_refused() {
        let (dir, base_path, top) = one_block_layer();
        let link = dir.path().join("link.layer");
        std::os::unix::fs::symlink(&top, &link).unwrap();
        assert!(over_raw(&base_path, &link, false).is_err());
        let fifo_like = dir.path().join("a-dir.layer");
        std::fs::create_dir(&fifo_like).unwrap();
        assert!(over_raw(&base_path, &fifo_like, false).is_err());
    }

    #[test]
    fn a_raw_disk_holding_a_layer_header_stays_raw() {
        // What a guest could write to its disk's first sector.
        let (_dir, _, top) = one_block_layer();
        let disk = DiskImage::open_raw(&top, false).unwrap();
        assert!(matches!(disk, DiskImage::Raw { .. }));
        let mut magic = [0u8; 8];
        disk.read_exact_at(&mut magic, 0).unwrap();
        assert_eq!(&magic, b"CAPLAYER", "read as the raw bytes it holds");
    }

    #[test]
    fn a_layer_claiming_a_huge_disk_is_refused_before_allocating() {
        let (_dir, base, top) = one_block_layer();
        let mut bytes = std::fs::read(&top).unwrap();
        bytes[12..16].copy_from_slice(&4096u32.to_le_bytes());
        bytes[16..24].copy_from_slice(&(1u64 << 50).to_le_bytes());
        reseal(&mut bytes);
        std::fs::write(&top, bytes).unwrap();
        let e = over_raw(&base, &top, false).unwrap_err().to_string();
        assert!(
            e.contains("too large an allocation map") || e.contains("not the image"),
            "{e}"
        );
    }

    #[test]
    fn keeping_layers_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = raw(dir.path(), "base.img", BLOCK_SIZE as usize, |_| 1);
        let mut disk = DiskImage::open_raw(&base_path, true).unwrap();
        disk.push_layer(&dir.path().join("top.layer")).unwrap();
        let taken = dir.path().join("taken");
        std::fs::write(&taken, b"someone else's").unwrap();
        assert!(disk
            .keep_layers_in(dir.path(), false, &|_| "taken".into())
            .is_err());
        assert_eq!(std::fs::read(&taken).unwrap(), b"someone else's");
        disk.keep_layers_in(dir.path(), false, &|_| "kept.layer".into())
            .unwrap();
        assert_eq!(disk.path(), dir.path().join("kept.layer"));
    }
}
