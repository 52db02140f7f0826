//! The agent's cgroup v2 counters as containerd's
//! `io.containerd.cgroups.v2.Metrics`, the message `ctr task metrics` and
//! the CRI stats read. The agent's message was shaped after it, so this is
//! field-for-field copying.

use cloister_protocol::agent::StatsContainerResponse;
use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, NetworkStat, PidsStat,
};

/// Converts the agent's stats of one container.
pub fn to_cgroup_v2_metrics(stats: &StatsContainerResponse) -> Metrics {
    let mut metrics = Metrics::new();
    if let Some(pids) = stats.pids.as_ref() {
        metrics.pids = Some(PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        })
        .into();
    }
    if let Some(cpu) = stats.cpu.as_ref() {
        metrics.cpu = Some(CPUStat {
            usage_usec: cpu.usage_usec,
            user_usec: cpu.user_usec,
            system_usec: cpu.system_usec,
            nr_periods: cpu.nr_periods,
            nr_throttled: cpu.nr_throttled,
            throttled_usec: cpu.throttled_usec,
            ..Default::default()
        })
        .into();
    }
    if let Some(m) = stats.memory.as_ref() {
        metrics.memory = Some(MemoryStat {
            usage: m.usage,
            usage_limit: m.usage_limit,
            swap_usage: m.swap_usage,
            swap_limit: m.swap_limit,
            anon: m.anon,
            file: m.file,
            kernel_stack: m.kernel_stack,
            slab: m.slab,
            sock: m.sock,
            shmem: m.shmem,
            file_mapped: m.file_mapped,
            file_dirty: m.file_dirty,
            file_writeback: m.file_writeback,
            pgfault: m.pgfault,
            pgmajfault: m.pgmajfault,
            inactive_anon: m.inactive_anon,
            active_anon: m.active_anon,
            inactive_file: m.inactive_file,
            active_file: m.active_file,
            unevictable: m.unevictable,
            ..Default::default()
        })
        .into();
        metrics.memory_events = Some(MemoryEvents {
            low: m.low_events,
            high: m.high_events,
            max: m.max_events,
            oom: m.oom_events,
            oom_kill: m.oom_kill_events,
            ..Default::default()
        })
        .into();
    }
    if let Some(io) = stats.io.as_ref() {
        metrics.io = Some(IOStat {
            usage: io
                .usage
                .iter()
                .map(|e| IOEntry {
                    major: e.major,
                    minor: e.minor,
                    rbytes: e.rbytes,
                    wbytes: e.wbytes,
                    rios: e.rios,
                    wios: e.wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .into();
    }
    metrics.network = stats
        .network
        .iter()
        .map(|n| NetworkStat {
            name: n.name.clone(),
            rx_bytes: n.rx_bytes,
            rx_packets: n.rx_packets,
            rx_errors: n.rx_errors,
            rx_dropped: n.rx_dropped,
            tx_bytes: n.tx_bytes,
            tx_packets: n.tx_packets,
            tx_errors: n.tx_errors,
            tx_dropped: n.tx_dropped,
            ..Default::default()
        })
        .collect();
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloister_protocol::agent;

    #[test]
    fn every_section_is_copied() {
        let mut stats = StatsContainerResponse::new();
        let mut cpu = agent::CpuStats::new();
        cpu.usage_usec = 1234;
        cpu.nr_throttled = 2;
        stats.cpu = Some(cpu).into();
        let mut memory = agent::MemoryStats::new();
        memory.usage = 4096;
        memory.usage_limit = 8192;
        memory.oom_kill_events = 1;
        stats.memory = Some(memory).into();
        let mut pids = agent::PidsStats::new();
        pids.current = 3;
        stats.pids = Some(pids).into();
        let mut io = agent::IoStats::new();
        let mut entry = agent::IoEntry::new();
        entry.major = 254;
        entry.wbytes = 10;
        io.usage.push(entry);
        stats.io = Some(io).into();
        let mut net = agent::NetworkStats::new();
        net.name = "eth0".into();
        net.rx_bytes = 99;
        stats.network.push(net);

        let m = to_cgroup_v2_metrics(&stats);
        assert_eq!((m.cpu.usage_usec, m.cpu.nr_throttled), (1234, 2));
        assert_eq!((m.memory.usage, m.memory.usage_limit), (4096, 8192));
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(m.pids.current, 3);
        assert_eq!((m.io.usage[0].major, m.io.usage[0].wbytes), (254, 10));
        assert_eq!(
            (m.network[0].name.as_str(), m.network[0].rx_bytes),
            ("eth0", 99)
        );
    }

    #[test]
    fn missing_sections_stay_unset() {
        let m = to_cgroup_v2_metrics(&StatsContainerResponse::new());
        assert!(m.cpu.is_none() && m.memory.is_none() && m.pids.is_none());
        assert!(m.network.is_empty());
    }
}
