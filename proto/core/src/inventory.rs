//! A machine's inventory: the facts an edge agent reports on enrollment and at every start, and
//! the input of the origin's policy resolution (brief 004's "policy criteria data").
//!
//! Pure data. The edge agent fills it (`edge_agent::inventory::collect`); the origin matches
//! rules against it (`origin::policy`). Every fact a machine may not be able to tell is an
//! `Option`, so an unreadable file never stops a report, and `#[serde(default)]` lets an origin
//! read reports from agents older or newer than itself.

use core::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::bounds;

/// Most disks, NICs or features one inventory lists; the decoder refuses more.
pub const MAX_INVENTORY_ITEMS: usize = 1024;

/// Facts about one machine, as collected by its edge agent plus what its operator configured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Inventory {
    /// CPU model name, e.g. `Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz`.
    #[serde(deserialize_with = "bounds::optional_name")]
    pub cpu_model: Option<String>,
    /// Logical CPUs the kernel lists.
    pub cpu_count: Option<u32>,
    /// Total memory the kernel manages, in bytes.
    pub memory_bytes: Option<u64>,
    /// Physical block devices, by kernel name.
    #[serde(deserialize_with = "disk_list")]
    pub disks: Vec<Disk>,
    /// Network interfaces with a hardware address (loopback excluded), by kernel name.
    #[serde(deserialize_with = "nic_list")]
    pub nics: Vec<Nic>,
    /// DMI system vendor, e.g. `Dell Inc.`.
    #[serde(deserialize_with = "bounds::optional_name")]
    pub manufacturer: Option<String>,
    /// DMI product name, e.g. `PowerEdge R640`.
    #[serde(deserialize_with = "bounds::optional_name")]
    pub model: Option<String>,
    /// DMI serial number (readable by root only on most machines).
    #[serde(deserialize_with = "bounds::optional_name")]
    pub serial: Option<String>,
    /// Address of the interface that holds the default route.
    pub address: Option<IpAddr>,
    /// The subnet of that interface in CIDR notation, e.g. `10.1.2.0/24`.
    #[serde(deserialize_with = "bounds::optional_name")]
    pub subnet: Option<String>,
    /// Role the operator configured, e.g. `web`.
    #[serde(deserialize_with = "bounds::optional_name")]
    pub role: Option<String>,
    /// Class the operator configured, e.g. `edge-cache`.
    #[serde(deserialize_with = "bounds::optional_name")]
    pub class: Option<String>,
    /// Site (datacenter) the operator configured.
    #[serde(deserialize_with = "bounds::optional_name")]
    pub site: Option<String>,
    /// Features the node asks for instead of (or on top of) a rule's bundles (brief 002).
    #[serde(deserialize_with = "feature_list")]
    pub features: Vec<String>,
}

/// One block device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Disk {
    /// Kernel name, e.g. `sda` or `nvme0n1`.
    #[serde(deserialize_with = "bounds::name")]
    pub name: String,
    /// Capacity in bytes.
    pub size_bytes: Option<u64>,
    /// True for spinning disks, false for solid state.
    pub rotational: Option<bool>,
    /// Model string the device reports.
    #[serde(deserialize_with = "bounds::optional_name")]
    pub model: Option<String>,
}

/// One network interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Nic {
    /// Kernel name, e.g. `eth0`.
    #[serde(deserialize_with = "bounds::name")]
    pub name: String,
    /// Hardware address, lower-case and colon-separated, e.g. `52:54:00:12:34:56`.
    #[serde(deserialize_with = "bounds::name")]
    pub mac: String,
}

fn disk_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Disk>, D::Error> {
    bounds::list(d, MAX_INVENTORY_ITEMS)
}

fn nic_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Nic>, D::Error> {
    bounds::list(d, MAX_INVENTORY_ITEMS)
}

fn feature_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    bounds::names(d, MAX_INVENTORY_ITEMS)
}
