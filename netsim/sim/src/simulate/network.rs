//! Max-min fair rates by progressive filling.
//!
//! Every flow's rate rises together; when a link fills, the flows crossing it freeze at that
//! rate and the rest keep rising. A flow may stand for several identical flows on some links
//! (its *weight* there: the simulator folds identical sites into one, so one flow on the origin
//! uplink can count for 200), and may carry its own rate cap (a congestion-control ceiling). The
//! result is the unique max-min fair allocation: no flow can go faster without slowing one that
//! is no faster than it.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// Index of a link in the capacity slice given to the solver.
pub type LinkId = u32;

/// Longest path a flow may take, in links.
pub const MAX_PATH_LINKS: usize = 3;

/// Loads and capacities below this are treated as zero (floating-point residue).
const EPSILON: f64 = 1e-9;

/// One flow as the solver sees it: the links it crosses and how many real flows it stands for on
/// each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlowLinks {
    links: [LinkId; MAX_PATH_LINKS],
    weights: [f64; MAX_PATH_LINKS],
    len: u8,
    cap: f64,
}

impl FlowLinks {
    /// A flow over `links` (at most [`MAX_PATH_LINKS`], no repeats), weight 1 on each, no cap.
    pub fn new(links: &[LinkId]) -> FlowLinks {
        assert!(
            !links.is_empty() && links.len() <= MAX_PATH_LINKS,
            "a flow crosses 1 to {MAX_PATH_LINKS} links, got {}",
            links.len()
        );
        let mut flow = FlowLinks {
            links: [0; MAX_PATH_LINKS],
            weights: [1.0; MAX_PATH_LINKS],
            len: links.len() as u8,
            cap: f64::INFINITY,
        };
        flow.links[..links.len()].copy_from_slice(links);
        flow
    }

    /// The same flow counting `weight` times on its `index`-th link.
    pub fn with_weight(mut self, index: usize, weight: f64) -> FlowLinks {
        assert!(index < self.len as usize && weight > 0.0);
        self.weights[index] = weight;
        self
    }

    /// The same flow never faster than `cap` (bytes per second).
    pub fn with_cap(mut self, cap: f64) -> FlowLinks {
        assert!(cap > 0.0);
        self.cap = cap;
        self
    }

    fn path(&self) -> impl Iterator<Item = (LinkId, f64)> + '_ {
        (0..self.len as usize).map(|i| (self.links[i], self.weights[i]))
    }
}

/// Max-min fair rates of `flows` over links with `capacities` (bytes per second, indexed by
/// [`LinkId`]). Allocates; the simulator reuses a [`MaxMinSolver`] instead.
pub fn max_min_rates(capacities: &[f64], flows: &[FlowLinks]) -> Vec<f64> {
    let mut rates = Vec::new();
    MaxMinSolver::default().solve(capacities, flows, &mut rates);
    rates
}

/// Progressive filling with buffers kept between calls, so a solve allocates nothing once warm.
/// Cost: O((F + L) log L) for F flows over L distinct links.
#[derive(Default)]
pub struct MaxMinSolver {
    /// Per global link: the stamp of the solve that last used it, and its local index then.
    stamp_of_link: Vec<u32>,
    local_of_link: Vec<u32>,
    stamp: u32,
    /// Per local link.
    global: Vec<LinkId>,
    remaining: Vec<f64>,
    load: Vec<f64>,
    filled: Vec<bool>,
    adjacency_start: Vec<u32>,
    adjacency: Vec<u32>,
    adjacency_fill: Vec<u32>,
    /// Per flow.
    frozen: Vec<bool>,
    local_path: Vec<[u32; MAX_PATH_LINKS]>,
    capped: Vec<(f64, u32)>,
    heap: BinaryHeap<Reverse<(Share, u32)>>,
}

impl MaxMinSolver {
    /// Writes the rate of each flow (per real flow, bytes per second) into `rates`.
    pub fn solve(&mut self, capacities: &[f64], flows: &[FlowLinks], rates: &mut Vec<f64>) {
        rates.clear();
        rates.resize(flows.len(), 0.0);
        if flows.is_empty() {
            return;
        }
        self.index_links(capacities, flows);
        self.capped.clear();
        for (i, flow) in flows.iter().enumerate() {
            if flow.cap.is_finite() {
                self.capped.push((flow.cap, i as u32));
            }
        }
        self.capped
            .sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut heap = std::mem::take(&mut self.heap).into_vec();
        heap.clear();
        heap.extend(
            (0..self.global.len())
                .filter(|&l| self.load[l] > EPSILON)
                .map(|l| Reverse((Share(self.share(l)), l as u32))),
        );
        self.heap = BinaryHeap::from(heap);

        let mut unfrozen = flows.len();
        let mut next_capped = 0;
        while unfrozen > 0 {
            while next_capped < self.capped.len()
                && self.frozen[self.capped[next_capped].1 as usize]
            {
                next_capped += 1;
            }
            let link = self.peek_link();
            let capped = self.capped.get(next_capped).copied();
            match (link, capped) {
                (Some((share, _)), Some((cap, flow))) if cap <= share => {
                    self.freeze(flows, flow as usize, cap, rates);
                    unfrozen -= 1;
                }
                (None, Some((cap, flow))) => {
                    self.freeze(flows, flow as usize, cap, rates);
                    unfrozen -= 1;
                }
                (Some((share, l)), _) => {
                    self.filled[l] = true;
                    let (start, end) = (
                        self.adjacency_start[l] as usize,
                        self.adjacency_start[l + 1] as usize,
                    );
                    for k in start..end {
                        let flow = self.adjacency[k] as usize;
                        if !self.frozen[flow] {
                            self.freeze(flows, flow, share, rates);
                            unfrozen -= 1;
                        }
                    }
                }
                (None, None) => {
                    // Only flows whose links all have no capacity left: they get nothing.
                    break;
                }
            }
        }
    }

    /// Assigns local indices to the links the flows touch, sums their loads and builds the
    /// link → flows adjacency.
    fn index_links(&mut self, capacities: &[f64], flows: &[FlowLinks]) {
        if self.stamp_of_link.len() < capacities.len() {
            self.stamp_of_link.resize(capacities.len(), 0);
            self.local_of_link.resize(capacities.len(), 0);
        }
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.stamp_of_link.fill(0);
            self.stamp = 1;
        }
        self.global.clear();
        self.remaining.clear();
        self.load.clear();
        self.local_path.clear();
        self.frozen.clear();
        self.frozen.resize(flows.len(), false);
        for flow in flows {
            let mut local = [0u32; MAX_PATH_LINKS];
            for (i, (link, weight)) in flow.path().enumerate() {
                let g = link as usize;
                if self.stamp_of_link[g] != self.stamp {
                    self.stamp_of_link[g] = self.stamp;
                    self.local_of_link[g] = self.global.len() as u32;
                    self.global.push(link);
                    self.remaining.push(capacities[g]);
                    self.load.push(0.0);
                }
                let l = self.local_of_link[g];
                self.load[l as usize] += weight;
                local[i] = l;
            }
            self.local_path.push(local);
        }
        let links = self.global.len();
        self.filled.clear();
        self.filled.resize(links, false);
        self.adjacency_start.clear();
        self.adjacency_start.resize(links + 1, 0);
        for (flow, local) in flows.iter().zip(&self.local_path) {
            for &l in &local[..flow.len as usize] {
                self.adjacency_start[l as usize + 1] += 1;
            }
        }
        for l in 0..links {
            self.adjacency_start[l + 1] += self.adjacency_start[l];
        }
        self.adjacency.clear();
        self.adjacency
            .resize(self.adjacency_start[links] as usize, u32::MAX);
        self.adjacency_fill.clear();
        self.adjacency_fill
            .extend_from_slice(&self.adjacency_start[..links]);
        for (i, (flow, local)) in flows.iter().zip(&self.local_path).enumerate() {
            for &l in &local[..flow.len as usize] {
                let slot = &mut self.adjacency_fill[l as usize];
                self.adjacency[*slot as usize] = i as u32;
                *slot += 1;
            }
        }
    }

    /// The link with the smallest fair share among links still carrying unfrozen flows.
    ///
    /// Heap keys are lazy: freezing a flow does not touch the heap. A link's share only grows
    /// while filling (flows freeze at the smallest share), so a key is a lower bound of its
    /// link's share; a top whose share grew is re-pushed with the new share, and a top whose key
    /// is current is the true minimum.
    fn peek_link(&mut self) -> Option<(f64, usize)> {
        while let Some(&Reverse((key, l))) = self.heap.peek() {
            let l = l as usize;
            if self.filled[l] || self.load[l] <= EPSILON {
                self.heap.pop();
                continue;
            }
            let share = self.share(l);
            if share > key.0 * (1.0 + 1e-12) + EPSILON {
                self.heap.pop();
                self.heap.push(Reverse((Share(share), l as u32)));
                continue;
            }
            return Some((share, l));
        }
        None
    }

    fn share(&self, l: usize) -> f64 {
        self.remaining[l].max(0.0) / self.load[l]
    }

    fn freeze(&mut self, flows: &[FlowLinks], flow: usize, rate: f64, rates: &mut [f64]) {
        self.frozen[flow] = true;
        rates[flow] = rate;
        let path = self.local_path[flow];
        for (i, (_, weight)) in flows[flow].path().enumerate() {
            let l = path[i] as usize;
            self.remaining[l] -= rate * weight;
            self.load[l] -= weight;
            if self.load[l] <= EPSILON {
                self.load[l] = 0.0;
            }
        }
    }
}

/// A fair share with a total order, for the heap.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Share(f64);

impl Eq for Share {}

impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Share {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_flows_two_links() {
        // Link 0 (10) carries flows a and b; link 1 (4) carries b and c.
        let rates = max_min_rates(
            &[10.0, 4.0],
            &[
                FlowLinks::new(&[0]),
                FlowLinks::new(&[0, 1]),
                FlowLinks::new(&[1]),
            ],
        );
        assert_eq!(rates, vec![8.0, 2.0, 2.0]);
    }

    #[test]
    fn weights_count_on_their_link_only() {
        // Flow 0 stands for 3 flows on link 0; flow 1 is alone there.
        let rates = max_min_rates(
            &[8.0, 100.0],
            &[
                FlowLinks::new(&[0, 1]).with_weight(0, 3.0),
                FlowLinks::new(&[0]),
            ],
        );
        assert_eq!(rates, vec![2.0, 2.0]);
    }

    #[test]
    fn caps_free_capacity_for_others() {
        let rates = max_min_rates(
            &[10.0],
            &[FlowLinks::new(&[0]).with_cap(1.0), FlowLinks::new(&[0])],
        );
        assert_eq!(rates, vec![1.0, 9.0]);
    }
}
