//! The Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI learns about its CPUs, its IOAPIC and its interrupt wiring.

use devices::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::layout::{IOAPIC, IOAPIC_PINS, LAPIC, MAX_VCPUS, MPTABLE, MP_FLOATING_POINTER};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// Builds the configuration table for `cpus` processors at `table_addr`.
pub fn build(cpus: u8) -> Result<(Vec<u8>, Vec<u8>)> {
    if cpus == 0 || cpus > MAX_VCPUS {
        return Err(Error::Config(format!("vCPU count must be 1..={MAX_VCPUS}")));
    }
    let ioapic_id = cpus + 1;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        entries.push(0u8); // processor entry
        entries.push(cpu); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.push(1); // bus entry
    entries.push(0);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.push(2); // IOAPIC entry
    entries.push(ioapic_id);
    entries.push(IOAPIC_VERSION);
    entries.push(1); // enabled
    entries.extend_from_slice(&(IOAPIC as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS as u8 {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus irq -> pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 of every CPU.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let length = (44 + entries.len()) as u16;
    let mut table = Vec::with_capacity(length as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"CAPSULE ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table
    table.push(0);
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(MPTABLE as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]);
    fp[10] = checksum(&fp);
    Ok((fp, table))
}

pub fn write(mem: &GuestMemory, cpus: u8) -> Result<()> {
    let (fp, table) = build(cpus)?;
    if MPTABLE + table.len() as u64 > MP_FLOATING_POINTER {
        return Err(Error::Config("MP table does not fit".into()));
    }
    mem.write_slice(&table, GuestAddress(MPTABLE))
        .and_then(|()| mem.write_slice(&fp, GuestAddress(MP_FLOATING_POINTER)))
        .map_err(|e| Error::Memory(format!("writing the MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_sizes_hold_for_all_cpu_counts() {
        for cpus in [1, 2, 17, MAX_VCPUS] {
            let (fp, table) = build(cpus).unwrap();
            assert_eq!(fp.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
            assert_eq!(table.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
            assert_eq!(
                u16::from_le_bytes([table[4], table[5]]) as usize,
                table.len()
            );
            assert!(MPTABLE + table.len() as u64 <= MP_FLOATING_POINTER);
        }
        assert!(build(0).is_err());
        assert!(build(MAX_VCPUS + 1).is_err());
    }
}
