//! The state file's container: a header, then tagged sections, each with
//! its length and a CRC-32 of its payload.
//!
//! ```text
//! magic [8] | version u32 | section count u32 | header CRC-32 u32
//! then per section: tag [4] | length u64 | section CRC-32 u32 | payload
//! ```
//!
//! A section's checksum covers its tag and length as well as its payload,
//! so a flipped bit anywhere is caught. All integers are little-endian. A
//! file is hostile until proven
//! otherwise: every length is checked against the bytes actually present
//! before anything is sliced or allocated, every section's checksum is
//! verified, and bytes after the last section are refused. Reading never
//! panics; it returns a [`FormatError`] that says what is wrong and where.

use crate::{FORMAT_VERSION, MAGIC};

/// Most sections a state file may declare (vCPUs, devices, VM, host).
pub const MAX_SECTIONS: u32 = 4096;

const HEADER_LEN: usize = 8 + 4 + 4 + 4;
const SECTION_HEADER_LEN: usize = 4 + 8 + 4;

/// A four-byte section tag, such as `*b"VCPU"`.
pub type Tag = [u8; 4];

/// Why a state file was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a Capsule snapshot (bad magic)")]
    BadMagic,
    #[error(
        "snapshot format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("the snapshot header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    #[error("the snapshot declares {0} sections; at most {MAX_SECTIONS} are allowed")]
    TooManySections(u32),
    #[error("the snapshot is truncated: {what} at byte {offset} needs {needed} bytes, {available} remain")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: u64,
        available: usize,
    },
    #[error("snapshot section {tag} at byte {offset} is corrupt (checksum mismatch)")]
    SectionChecksum { tag: String, offset: usize },
    #[error("the snapshot has {0} unexpected bytes after its last section")]
    TrailingBytes(usize),
}

/// One section of a parsed state file, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section<'a> {
    pub tag: Tag,
    pub payload: &'a [u8],
}

/// Builds a state file section by section.
#[derive(Debug, Default)]
pub struct StateWriter {
    sections: Vec<(Tag, Vec<u8>)>,
}

impl StateWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a section; sections keep their order, and a tag may repeat
    /// (one `VCPU` section per vCPU).
    pub fn section(&mut self, tag: Tag, payload: Vec<u8>) -> &mut Self {
        self.sections.push((tag, payload));
        self
    }

    /// The whole file. Panics only if more than [`MAX_SECTIONS`] sections
    /// were added, which is a bug in the caller, not bad input.
    pub fn to_bytes(&self) -> Vec<u8> {
        let count = u32::try_from(self.sections.len())
            .ok()
            .filter(|&n| n <= MAX_SECTIONS)
            .expect("more sections than a state file may hold");
        let body: usize = self
            .sections
            .iter()
            .map(|(_, p)| SECTION_HEADER_LEN + p.len())
            .sum();
        let mut out = Vec::with_capacity(HEADER_LEN + body);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        let header_crc = crc32fast::hash(&out);
        out.extend_from_slice(&header_crc.to_le_bytes());
        for (tag, payload) in &self.sections {
            let len = payload.len() as u64;
            out.extend_from_slice(tag);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&section_crc(tag, len, payload).to_le_bytes());
            out.extend_from_slice(payload);
        }
        out
    }
}

fn section_crc(tag: &Tag, len: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(tag);
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// A cursor over untrusted bytes that refuses to read past the end.
struct Cursor<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, len: u64, what: &'static str) -> Result<&'a [u8], FormatError> {
        let available = self.bytes.len() - self.offset;
        let truncated = FormatError::Truncated {
            what,
            offset: self.offset,
            needed: len,
            available,
        };
        let len = usize::try_from(len).map_err(|_| truncated.clone())?;
        if len > available {
            return Err(truncated);
        }
        let slice = &self.bytes[self.offset..self.offset + len];
        self.offset += len;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FormatError> {
        let slice = self.take(N as u64, what)?;
        let mut array = [0u8; N];
        array.copy_from_slice(slice);
        Ok(array)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
}

/// Checks a whole state file and returns its sections in order.
pub fn parse(bytes: &[u8]) -> Result<Vec<Section<'_>>, FormatError> {
    let mut cur = Cursor { bytes, offset: 0 };
    // The magic first, so an unrelated file gets the plainest message.
    let magic: [u8; 8] = cur.array("the magic number")?;
    if magic != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = cur.u32("the format version")?;
    let count = cur.u32("the section count")?;
    let header_crc = cur.u32("the header checksum")?;
    if crc32fast::hash(&bytes[..HEADER_LEN - 4]) != header_crc {
        return Err(FormatError::HeaderChecksum);
    }
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if count > MAX_SECTIONS {
        return Err(FormatError::TooManySections(count));
    }
    let mut sections = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let start = cur.offset;
        let tag: Tag = cur.array("a section tag")?;
        let len = cur.u64("a section length")?;
        let crc = cur.u32("a section checksum")?;
        let payload = cur.take(len, "a section payload")?;
        if section_crc(&tag, len, payload) != crc {
            return Err(FormatError::SectionChecksum {
                tag: String::from_utf8_lossy(&tag).into_owned(),
                offset: start,
            });
        }
        sections.push(Section { tag, payload });
    }
    match bytes.len() - cur.offset {
        0 => Ok(sections),
        extra => Err(FormatError::TrailingBytes(extra)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = StateWriter::new();
        w.section(*b"HOST", b"x86_64 AuthenticAMD".to_vec())
            .section(*b"VCPU", vec![1; 300])
            .section(*b"VCPU", vec![2; 300])
            .section(*b"NONE", Vec::new());
        w.to_bytes()
    }

    #[test]
    fn round_trips_in_order_with_repeated_tags() {
        let bytes = sample();
        let s = parse(&bytes).unwrap();
        let tags: Vec<&[u8]> = s.iter().map(|s| &s.tag[..]).collect();
        assert_eq!(tags, [&b"HOST"[..], b"VCPU", b"VCPU", b"NONE"]);
        assert_eq!(s[2].payload, &[2u8; 300][..]);
        assert!(s[3].payload.is_empty());
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            let err = parse(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, FormatError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let bytes = sample();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    parse(&bad).is_err(),
                    "flip of bit {bit} in byte {i} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn wrong_magic_version_and_trailing_bytes_say_so() {
        assert_eq!(
            parse(b"ELF\x7f....garbage....."),
            Err(FormatError::BadMagic)
        );

        // A well-formed header from a future version.
        let mut future = Vec::new();
        future.extend_from_slice(&MAGIC);
        future.extend_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        future.extend_from_slice(&0u32.to_le_bytes());
        let crc = crc32fast::hash(&future);
        future.extend_from_slice(&crc.to_le_bytes());
        let err = parse(&future).unwrap_err();
        assert_eq!(
            err,
            FormatError::UnsupportedVersion {
                found: FORMAT_VERSION + 1,
                supported: FORMAT_VERSION
            }
        );
        assert!(err.to_string().contains("not supported"), "{err}");

        let mut long = sample();
        long.extend_from_slice(b"junk");
        assert_eq!(parse(&long), Err(FormatError::TrailingBytes(4)));
    }

    #[test]
    fn huge_declared_sizes_are_refused_without_allocating() {
        // A valid header claiming the most sections, then one section
        // claiming u64::MAX bytes: both refused by checking, not by
        // running out of memory.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(MAX_SECTIONS + 1).to_le_bytes());
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(
            parse(&bytes),
            Err(FormatError::TooManySections(MAX_SECTIONS + 1))
        );

        let mut bytes = StateWriter::new().section(*b"VCPU", Vec::new()).to_bytes();
        bytes[HEADER_LEN + 4..HEADER_LEN + 12].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = parse(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::Truncated {
                    needed: u64::MAX,
                    ..
                }
            ),
            "{err}"
        );
    }
}
