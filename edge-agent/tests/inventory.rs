//! Inventory collection against fake `/proc` and `/sys` trees, and once against the real one.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use edge_agent::inventory::{collect, Configured, HOST_ROOT};
use proto::inventory::{Disk, Inventory, Nic};

fn write(root: &Path, path: &str, contents: &str) {
    let path = root.join(path);
    fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
    fs::write(path, contents).expect("write");
}

/// An address as `/proc/net/route` prints it: the network-order bytes read as a native integer.
fn kernel_hex(address: [u8; 4]) -> String {
    format!("{:08X}", u32::from_ne_bytes(address))
}

fn route_line(
    iface: &str,
    destination: [u8; 4],
    gateway: [u8; 4],
    flags: u32,
    mask: [u8; 4],
) -> String {
    format!(
        "{iface}\t{}\t{}\t{flags:04X}\t0\t0\t100\t{}\t0\t0\t0\n",
        kernel_hex(destination),
        kernel_hex(gateway),
        kernel_hex(mask)
    )
}

const ROUTE_HEADER: &str =
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";

const FIB_TRIE: &str = "\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.1.2.0/24 2 0 2
        +-- 10.1.2.0/28 2 0 2
           |-- 10.1.2.0
              /24 link UNICAST
           |-- 10.1.2.7
              /32 host LOCAL
        |-- 10.1.2.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 172.17.0.0/16 2 0 2
           |-- 172.17.0.1
              /32 host LOCAL
";

/// A machine with two CPUs, 16 GiB, a spinning disk, an NVMe disk, a loop device, three NICs
/// (one uppercase MAC, one without an address), Dell DMI data, and a default route on eth0.
fn fake_machine(root: &Path) {
    let cpu = "processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz\nflags\t\t: fpu vme\n\n";
    write(
        root,
        "proc/cpuinfo",
        &format!("{}{}", cpu.replace("{n}", "0"), cpu.replace("{n}", "1")),
    );
    write(
        root,
        "proc/meminfo",
        "MemTotal:       16318284 kB\nMemFree:         1234567 kB\n",
    );

    write(root, "sys/block/sda/size", "7814037168\n");
    write(root, "sys/block/sda/queue/rotational", "1\n");
    write(root, "sys/block/sda/device/model", "ST4000NM0035    \n");
    write(root, "sys/block/nvme0n1/size", "1953525168\n");
    write(root, "sys/block/nvme0n1/queue/rotational", "0\n");
    fs::create_dir_all(root.join("sys/block/nvme0n1/device")).expect("mkdir");
    write(root, "sys/block/loop0/size", "0\n");

    write(root, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
    write(root, "sys/class/net/eth0/address", "52:54:00:12:34:56\n");
    write(root, "sys/class/net/eth1/address", "AA:BB:CC:DD:EE:0F\n");
    write(root, "sys/class/net/tun0/address", "\n");

    write(root, "sys/class/dmi/id/sys_vendor", "Dell Inc.\n");
    write(root, "sys/class/dmi/id/product_name", "PowerEdge R640\n");
    write(root, "sys/class/dmi/id/product_serial", "ABC1234\n");

    let routes = [
        ROUTE_HEADER.to_owned(),
        route_line("docker0", [172, 17, 0, 0], [0; 4], 0x1, [255, 255, 0, 0]),
        route_line("eth0", [0; 4], [10, 1, 2, 1], 0x3, [0; 4]),
        route_line("eth0", [10, 1, 2, 0], [0; 4], 0x1, [255, 255, 255, 0]),
    ]
    .concat();
    write(root, "proc/net/route", &routes);
    write(root, "proc/net/fib_trie", FIB_TRIE);
}

fn configured() -> Configured {
    Configured {
        role: Some("web".into()),
        class: Some("cache".into()),
        site: Some("ams".into()),
        features: vec!["bgp".into()],
    }
}

fn expected_machine() -> Inventory {
    Inventory {
        cpu_model: Some("Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz".into()),
        cpu_count: Some(2),
        memory_bytes: Some(16318284 * 1024),
        disks: vec![
            Disk {
                name: "nvme0n1".into(),
                size_bytes: Some(1953525168 * 512),
                rotational: Some(false),
                model: None,
            },
            Disk {
                name: "sda".into(),
                size_bytes: Some(7814037168 * 512),
                rotational: Some(true),
                model: Some("ST4000NM0035".into()),
            },
        ],
        nics: vec![
            Nic {
                name: "eth0".into(),
                mac: "52:54:00:12:34:56".into(),
            },
            Nic {
                name: "eth1".into(),
                mac: "aa:bb:cc:dd:ee:0f".into(),
            },
        ],
        manufacturer: Some("Dell Inc.".into()),
        model: Some("PowerEdge R640".into()),
        serial: Some("ABC1234".into()),
        address: Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 7))),
        subnet: Some("10.1.2.0/24".into()),
        role: Some("web".into()),
        class: Some("cache".into()),
        site: Some("ams".into()),
        features: vec!["bgp".into()],
    }
}

#[test]
fn facts_are_read_from_the_tree() {
    type Change = fn(&Path);
    type Expect = fn(&mut Inventory);
    // (what differs from the full machine, change to the tree, change to the expected facts)
    let cases: Vec<(&str, Change, Expect)> = vec![
        ("nothing", |_| {}, |_| {}),
        (
            "no DMI at all",
            |root| fs::remove_dir_all(root.join("sys/class/dmi")).expect("rm"),
            |inv| {
                inv.manufacturer = None;
                inv.model = None;
                inv.serial = None;
            },
        ),
        (
            "serial unreadable, placeholders from the firmware",
            |root| {
                fs::remove_file(root.join("sys/class/dmi/id/product_serial")).expect("rm");
                write(
                    root,
                    "sys/class/dmi/id/sys_vendor",
                    "To Be Filled By O.E.M.\n",
                );
                write(root, "sys/class/dmi/id/product_name", "   \n");
            },
            |inv| {
                inv.manufacturer = None;
                inv.model = None;
                inv.serial = None;
            },
        ),
        (
            "no default route",
            |root| {
                let only_docker = [
                    ROUTE_HEADER.to_owned(),
                    route_line("docker0", [172, 17, 0, 0], [0; 4], 0x1, [255, 255, 0, 0]),
                ]
                .concat();
                write(root, "proc/net/route", &only_docker);
            },
            |inv| {
                inv.address = None;
                inv.subnet = None;
            },
        ),
        (
            "no fib_trie: the subnet without the address",
            |root| fs::remove_file(root.join("proc/net/fib_trie")).expect("rm"),
            |inv| inv.address = None,
        ),
        (
            "garbage where numbers belong",
            |root| {
                write(root, "proc/meminfo", "MemTotal: lots\n");
                write(root, "sys/block/sda/size", "big\n");
                write(root, "proc/net/route", "Iface\nnot a route at all\n");
            },
            |inv| {
                inv.memory_bytes = None;
                inv.disks[1].size_bytes = None;
                inv.address = None;
                inv.subnet = None;
            },
        ),
        (
            "an ARM board's cpuinfo",
            |root| {
                write(
                    root,
                    "proc/cpuinfo",
                    "processor\t: 0\nBogoMIPS\t: 108.00\n\nprocessor\t: 1\n\nprocessor\t: 2\n\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n",
                );
            },
            |inv| {
                inv.cpu_model = Some("Raspberry Pi 4 Model B Rev 1.4".into());
                inv.cpu_count = Some(3);
            },
        ),
    ];
    for (name, change, expect) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        fake_machine(dir.path());
        change(dir.path());
        let mut expected = expected_machine();
        expect(&mut expected);
        assert_eq!(collect(dir.path(), configured()), expected, "{name}");
    }
}

#[test]
fn an_empty_tree_gives_only_what_was_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inventory = collect(dir.path(), configured());
    assert_eq!(
        inventory,
        Inventory {
            role: Some("web".into()),
            class: Some("cache".into()),
            site: Some("ams".into()),
            features: vec!["bgp".into()],
            ..Inventory::default()
        }
    );
}

#[test]
fn the_real_machine_can_be_inventoried() {
    let inventory = collect(Path::new(HOST_ROOT), Configured::default());
    if Path::new("/proc/meminfo").exists() {
        assert!(
            inventory.memory_bytes.is_some_and(|b| b > 0),
            "{inventory:?}"
        );
    }
    if Path::new("/proc/cpuinfo").exists() {
        assert!(inventory.cpu_count.is_some_and(|n| n > 0), "{inventory:?}");
    }
    assert!(inventory.nics.iter().all(|nic| nic.name != "lo"));
    assert_eq!(inventory.role, None);
}
