//! vCPUs: their boot state (registers, CPUID, MSRs, LAPIC) and the thread
//! that runs each one.

pub mod cpuid;
pub mod regs;
pub mod state;
pub mod vcpu;
