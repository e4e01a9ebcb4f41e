//! Folding: classes of identical sites and of identical regions, each simulated once.
//!
//! Two sites fold together when they are equal in everything but the name and their regions
//! fold together (or neither has one). Two regions fold together when they are equal in
//! everything but the name and hold the same sites up to names: then, given the same seeds,
//! every member of a class behaves as its representative, and a class's flows count once per
//! member on the links members share (the origin's uplink; a region's link to its sites).

use std::collections::HashMap;

use crate::topology::Topology;

/// Which sites and regions are simulated, and how many each stands for.
pub(super) struct Classes {
    /// Per class of sites: the site simulated, as an index in `Topology::sites`. It belongs to
    /// no region or to its region class's representative.
    pub site_representatives: Vec<usize>,
    /// Per class of sites: how many sites of the whole topology it stands for.
    pub site_members: Vec<u32>,
    /// Per site of the topology: its class.
    pub class_of_site: Vec<usize>,
    /// Per class of regions: the region simulated, as an index in `Topology::regions`.
    pub region_representatives: Vec<usize>,
    /// Per class of regions: how many regions it stands for.
    pub region_members: Vec<u32>,
    /// Per region of the topology: its class.
    pub class_of_region: Vec<usize>,
}

/// A region's shape: stagers, its link, and the shapes of its sites (names aside), sorted.
type RegionKey = (u32, [u64; 4], Vec<[u64; 8]>);

impl Classes {
    /// The classes of `topo`; with `fold` false, every site and region is its own class.
    pub fn new(topo: &Topology, fold: bool) -> Classes {
        let region_by_name: HashMap<&str, usize> = topo
            .regions
            .iter()
            .enumerate()
            .map(|(i, region)| (region.name.as_str(), i))
            .collect();
        let region_of_site: Vec<Option<usize>> = topo
            .sites
            .iter()
            .map(|site| {
                site.region
                    .as_deref()
                    .and_then(|n| region_by_name.get(n).copied())
            })
            .collect();
        let shape_without_region = |site: usize| {
            let mut key = topo.sites[site].shape_key();
            key[0] = 0;
            key
        };

        let mut region_shapes: Vec<Vec<[u64; 8]>> = vec![Vec::new(); topo.regions.len()];
        for (site, region) in region_of_site.iter().enumerate() {
            if let Some(region) = region {
                region_shapes[*region].push(shape_without_region(site));
            }
        }
        let mut class_of_region = Vec::with_capacity(topo.regions.len());
        let mut region_representatives = Vec::new();
        let mut region_members: Vec<u32> = Vec::new();
        let mut region_class_by_key: HashMap<RegionKey, usize> = HashMap::new();
        for (i, (region, mut shapes)) in topo.regions.iter().zip(region_shapes).enumerate() {
            let class = if fold {
                shapes.sort_unstable();
                let wan = [
                    region.wan.mbit.to_bits(),
                    region.wan.latency_ms.to_bits(),
                    region.wan.jitter_ms.to_bits(),
                    region.wan.loss.to_bits(),
                ];
                *region_class_by_key
                    .entry((region.stagers, wan, shapes))
                    .or_insert_with(|| {
                        region_representatives.push(i);
                        region_members.push(0);
                        region_representatives.len() - 1
                    })
            } else {
                region_representatives.push(i);
                region_members.push(0);
                region_representatives.len() - 1
            };
            region_members[class] += 1;
            class_of_region.push(class);
        }

        let mut class_of_site = Vec::with_capacity(topo.sites.len());
        let mut site_members: Vec<u32> = Vec::new();
        let mut site_class_by_key: HashMap<[u64; 8], usize> = HashMap::new();
        for (site, region) in region_of_site.iter().enumerate() {
            let class = if fold {
                let mut key = shape_without_region(site);
                key[0] = region.map_or(0, |r| class_of_region[r] as u64 + 1);
                let next = site_members.len();
                *site_class_by_key.entry(key).or_insert(next)
            } else {
                site_members.len()
            };
            if class == site_members.len() {
                site_members.push(0);
            }
            site_members[class] += 1;
            class_of_site.push(class);
        }
        // A class is simulated through its first site outside a folded-away region: regions of
        // one class hold the same sites, so the representative region holds one of each class.
        let mut site_representatives = vec![usize::MAX; site_members.len()];
        for (site, &class) in class_of_site.iter().enumerate() {
            let in_representative = region_of_site[site]
                .is_none_or(|r| region_representatives[class_of_region[r]] == r);
            if site_representatives[class] == usize::MAX && in_representative {
                site_representatives[class] = site;
            }
        }
        debug_assert!(site_representatives.iter().all(|&s| s != usize::MAX));
        Classes {
            site_representatives,
            site_members,
            class_of_site,
            region_representatives,
            region_members,
            class_of_region,
        }
    }

    /// How many sites of a class each region of its region class holds (all of them for a
    /// class outside regions): the class's weight on its region's link to its sites.
    pub fn site_members_per_region(&self, topo: &Topology, class: usize) -> u32 {
        let representative = &topo.sites[self.site_representatives[class]];
        let regions = representative
            .region
            .as_deref()
            .and_then(|name| topo.regions.iter().position(|r| r.name == name))
            .map_or(1, |r| self.region_members[self.class_of_region[r]]);
        self.site_members[class] / regions
    }
}
