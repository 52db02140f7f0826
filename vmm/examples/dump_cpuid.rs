//! Prints what KVM_GET_SUPPORTED_CPUID offers and what vCPU 0 of a 1-vCPU
//! VM gets under each CPU template: for comparing hosts and templates.

use cloister_vmm::cpuid::{cpuid_for_vcpu, CpuTemplate};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = kvm_ioctls::Kvm::new()?;
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for template in [None, Some(CpuTemplate::Host), Some(CpuTemplate::NestedPvm)] {
        let name = template.map_or("supported".to_string(), |t| t.to_string());
        println!("== {name}");
        let cpuid = match template {
            None => supported.clone(),
            Some(t) => cpuid_for_vcpu(&supported, t, 0, 1),
        };
        for e in cpuid.as_slice() {
            println!(
                "{:#010x}.{:<2} eax={:08x} ebx={:08x} ecx={:08x} edx={:08x}",
                e.function, e.index, e.eax, e.ebx, e.ecx, e.edx
            );
        }
    }
    Ok(())
}
