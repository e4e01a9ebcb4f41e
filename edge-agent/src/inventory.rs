//! Collects this machine's [`Inventory`] from `/proc` and `/sys` (Linux), for enrollment and for
//! the report at every start.
//!
//! Every fact is optional: a file that is missing, unreadable (DMI serials are root-only) or
//! malformed leaves its fact `None` and never fails the report. Everything is read under a root
//! directory, `/` on a real machine, so tests can point it at a fake tree.

use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use proto::inventory::{Disk, Inventory, Nic};

/// The root of a real machine's `/proc` and `/sys`.
pub const HOST_ROOT: &str = "/";

/// Bytes read from any one file (a large machine's `/proc/cpuinfo` is well under this).
pub const MAX_FACT_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Characters kept of a text fact (model, vendor, serial); the rest is cut.
pub const MAX_FACT_CHARS: usize = 256;

/// Block devices reported; the rest (in name order) are left out.
pub const MAX_DISKS: usize = 256;

/// Network interfaces reported; the rest (in name order) are left out.
pub const MAX_NICS: usize = 256;

/// Bytes per sector in `/sys/block/*/size`, whatever the device's own sector size.
const SYSFS_SECTOR_BYTES: u64 = 512;

/// `RTF_UP` and `RTF_GATEWAY` in `/proc/net/route`'s flags.
const ROUTE_UP: u32 = 0x1;
const ROUTE_GATEWAY: u32 = 0x2;

/// DMI values firmware uses when the vendor filled in nothing (compared case-insensitively).
const DMI_PLACEHOLDERS: &[&str] = &[
    "to be filled by o.e.m.",
    "default string",
    "not specified",
    "not applicable",
    "system manufacturer",
    "system product name",
    "system serial number",
    "none",
    "n/a",
    "0",
    "0123456789",
];

/// What the operator configured for this node, reported alongside the collected facts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Configured {
    /// Role, e.g. `web`.
    pub role: Option<String>,
    /// Class, e.g. `edge-cache`.
    pub class: Option<String>,
    /// Site (datacenter).
    pub site: Option<String>,
    /// Features the node asks for (brief 002).
    pub features: Vec<String>,
}

/// Collects the inventory of the machine whose `/proc` and `/sys` are under `root`
/// ([`HOST_ROOT`] on a real machine). Never fails: what cannot be read is `None` or left out.
pub fn collect(root: &Path, configured: Configured) -> Inventory {
    let (cpu_model, cpu_count) = cpu(root);
    let (address, subnet) = default_route_subnet(root);
    let dmi = |file: &str| read_fact(&root.join("sys/class/dmi/id").join(file)).and_then(dmi_value);
    Inventory {
        cpu_model,
        cpu_count,
        memory_bytes: memory_bytes(root),
        disks: disks(root),
        nics: nics(root),
        manufacturer: dmi("sys_vendor"),
        model: dmi("product_name"),
        serial: dmi("product_serial"),
        address: address.map(IpAddr::V4),
        subnet,
        role: configured.role,
        class: configured.class,
        site: configured.site,
        features: configured.features,
    }
}

/// The CPU model and the number of logical CPUs, from `/proc/cpuinfo`.
fn cpu(root: &Path) -> (Option<String>, Option<u32>) {
    let Some(text) = read_fact(&root.join("proc/cpuinfo")) else {
        return (None, None);
    };
    // x86 says `model name`; other architectures use other keys, in this order of preference.
    const MODEL_KEYS: [&str; 5] = ["model name", "Model", "cpu model", "cpu", "uarch"];
    let mut processors = 0u32;
    let mut model: Option<(usize, String)> = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim();
        if key == "processor" {
            processors = processors.saturating_add(1);
        }
        if let Some(rank) = MODEL_KEYS.iter().position(|k| *k == key) {
            if model.as_ref().is_none_or(|(best, _)| rank < *best) {
                if let Some(value) = clean(value) {
                    model = Some((rank, value));
                }
            }
        }
    }
    (
        model.map(|(_, m)| m),
        (processors > 0).then_some(processors),
    )
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn memory_bytes(root: &Path) -> Option<u64> {
    let text = read_fact(&root.join("proc/meminfo"))?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let amount: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => amount.checked_mul(1024),
        None => Some(amount),
        Some(_) => None,
    }
}

/// Block devices backed by hardware (those with a `device` link: not loop, zram, dm or ram).
fn disks(root: &Path) -> Vec<Disk> {
    let block = root.join("sys/block");
    sorted_entries(&block)
        .into_iter()
        .filter(|name| block.join(name).join("device").exists())
        .take(MAX_DISKS)
        .map(|name| {
            let dir = block.join(&name);
            Disk {
                size_bytes: read_fact(&dir.join("size"))
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .and_then(|sectors| sectors.checked_mul(SYSFS_SECTOR_BYTES)),
                rotational: read_fact(&dir.join("queue/rotational")).and_then(|s| match s.trim() {
                    "1" => Some(true),
                    "0" => Some(false),
                    _ => None,
                }),
                model: read_fact(&dir.join("device/model")).and_then(|s| clean(&s)),
                name,
            }
        })
        .collect()
}

/// Interfaces with a non-zero hardware address, loopback excluded.
fn nics(root: &Path) -> Vec<Nic> {
    let net = root.join("sys/class/net");
    sorted_entries(&net)
        .into_iter()
        .filter(|name| name != "lo")
        .filter_map(|name| {
            let mac = read_fact(&net.join(&name).join("address"))?
                .trim()
                .to_ascii_lowercase();
            let meaningful = !mac.is_empty()
                && mac.len() <= MAX_FACT_CHARS
                && mac.chars().all(|c| c.is_ascii_hexdigit() || c == ':')
                && mac.chars().any(|c| c.is_ascii_hexdigit() && c != '0');
            meaningful.then_some(Nic { name, mac })
        })
        .take(MAX_NICS)
        .collect()
}

/// The address and subnet (CIDR) of the interface holding the default route.
///
/// The subnet is the interface's connected route in `/proc/net/route` that contains the default
/// gateway (or its longest one when the default route has no gateway); the address is the
/// local address in that subnet from `/proc/net/fib_trie`.
fn default_route_subnet(root: &Path) -> (Option<Ipv4Addr>, Option<String>) {
    let Some(table) = read_fact(&root.join("proc/net/route")) else {
        return (None, None);
    };
    let routes: Vec<Route> = table.lines().skip(1).filter_map(Route::parse).collect();
    let Some(default) = routes
        .iter()
        .filter(|r| r.is_up() && r.destination == 0 && r.mask == 0)
        .min_by_key(|r| r.metric)
    else {
        return (None, None);
    };
    let Some(connected) = routes
        .iter()
        .filter(|r| {
            r.is_up()
                && r.interface == default.interface
                && r.flags & ROUTE_GATEWAY == 0
                && r.mask != 0
                && (default.gateway == 0 || default.gateway & r.mask == r.destination & r.mask)
        })
        .filter_map(|r| Some((r, prefix_len(r.mask)?)))
        .max_by_key(|(_, prefix)| *prefix)
    else {
        return (None, None);
    };
    let (route, prefix) = connected;
    let network = route.destination & route.mask;
    let subnet = format!("{}/{prefix}", Ipv4Addr::from(network));
    let address = read_fact(&root.join("proc/net/fib_trie"))
        .and_then(|trie| local_address_in(&trie, network, route.mask));
    (address, Some(subnet))
}

/// One line of `/proc/net/route`, addresses as host-order integers.
struct Route {
    interface: String,
    destination: u32,
    gateway: u32,
    flags: u32,
    metric: u32,
    mask: u32,
}

impl Route {
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return None;
        }
        Some(Self {
            interface: fields[0].to_owned(),
            destination: kernel_hex_address(fields[1])?,
            gateway: kernel_hex_address(fields[2])?,
            flags: u32::from_str_radix(fields[3], 16).ok()?,
            metric: fields[6].parse().ok()?,
            mask: kernel_hex_address(fields[7])?,
        })
    }

    fn is_up(&self) -> bool {
        self.flags & ROUTE_UP != 0
    }
}

/// `/proc/net/route` prints each network-order address as a native-endian integer in hex.
fn kernel_hex_address(field: &str) -> Option<u32> {
    let raw = u32::from_str_radix(field, 16).ok()?;
    Some(u32::from(Ipv4Addr::from(raw.to_ne_bytes())))
}

/// The prefix length of a contiguous mask.
fn prefix_len(mask: u32) -> Option<u32> {
    (mask.leading_ones() == mask.count_ones()).then_some(mask.leading_ones())
}

/// The first `/32 host LOCAL` entry of the trie that lies in `network`/`mask`.
///
/// The trie lists each leaf as `|-- 10.0.2.15` followed by lines such as `/32 host LOCAL`.
fn local_address_in(trie: &str, network: u32, mask: u32) -> Option<Ipv4Addr> {
    let mut leaf: Option<Ipv4Addr> = None;
    for line in trie.lines() {
        let line = line.trim();
        if let Some(address) = line.strip_prefix("|--") {
            leaf = address.trim().parse().ok();
        } else if line.starts_with("/32 host LOCAL") {
            if let Some(address) = leaf {
                if u32::from(address) & mask == network {
                    return Some(address);
                }
            }
        }
    }
    None
}

/// A DMI value, or `None` for empty and placeholder values.
fn dmi_value(raw: String) -> Option<String> {
    let value = clean(&raw)?;
    let lower = value.to_ascii_lowercase();
    (!DMI_PLACEHOLDERS.contains(&lower.as_str())).then_some(value)
}

/// Trims, drops control characters and cuts to [`MAX_FACT_CHARS`]; `None` when empty.
fn clean(raw: &str) -> Option<String> {
    let value: String = raw
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_FACT_CHARS)
        .collect();
    let value = value.trim_end();
    (!value.is_empty()).then(|| value.to_owned())
}

/// Reads at most [`MAX_FACT_FILE_BYTES`] of a file as text; `None` when it cannot be read.
fn read_fact(path: &Path) -> Option<String> {
    let mut bytes = Vec::new();
    File::open(path)
        .ok()?
        .take(MAX_FACT_FILE_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Names in a directory, sorted; empty when it cannot be read.
fn sorted_entries(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}
