//! A disk layer file from someone else's snapshot, opened over a raw image:
//! its header (resealed with a valid checksum half the time, as an
//! attacker would) and, if it opens, reads and writes through it.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use devices::disk::DiskImage;
use libfuzzer_sys::fuzz_target;

const SIZE: usize = 4 * 64 * 1024;

/// A raw base with a fixed modification time (so a layer made over it is
/// valid in every run), and a valid layer over it to mutate.
fn fixture() -> &'static (PathBuf, Vec<u8>, PathBuf) {
    static FIXTURE: OnceLock<(PathBuf, Vec<u8>, PathBuf)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("capsule-fuzz-layer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.img");
        std::fs::write(&base, vec![0x5a; SIZE]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&base)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000))
            .unwrap();
        let template = dir.join("template.layer");
        let mut image = DiskImage::open_raw(&base, false).unwrap();
        image.push_layer(&template).unwrap();
        drop(image);
        let bytes = std::fs::read(&template).unwrap();
        (base, bytes, dir.join("fuzzed.layer"))
    })
}

fuzz_target!(|data: &[u8]| {
    let (base, template, path) = fixture();
    let Some((&mode, header)) = data.split_first() else {
        return;
    };
    let mut bytes = template.clone();
    let n = header.len().min(bytes.len());
    bytes[..n].copy_from_slice(&header[..n]);
    if mode & 1 == 1 && bytes.len() >= 80 {
        // Reseal: the checksum covers the header up to the base name.
        let name_len = u32::from_le_bytes(bytes[76..80].try_into().unwrap()) as usize;
        let end = 80 + name_len;
        if end + 4 <= 4096 {
            let crc = crc32fast::hash(&bytes[..end]);
            bytes[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
    std::fs::write(path, &bytes).unwrap();
    let Ok(raw) = DiskImage::open_raw(base, false) else {
        return;
    };
    if let Ok(mut layer) = DiskImage::open_layer(path, raw, true) {
        let mut buf = vec![0u8; 8192];
        let size = layer.size();
        let _ = layer.read_exact_at(&mut buf, 0);
        let _ = layer.read_exact_at(&mut buf, size.saturating_sub(8192));
        let _ = layer.write_all_at(&buf[..100], u64::from(mode) * 511);
    }
});
