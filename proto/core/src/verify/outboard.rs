//! A blob's outboard: the inner nodes of its hash tree (64 bytes per pair of children) in post
//! order, about 0.4 % of the data, and where each node's entry lies in it.

use std::fmt;

use bao_tree::iter::BaoChunk;
use bao_tree::{BaoTree, TreeNode};

use super::walk::{hash_subtree, parent_cv};
use super::{block_size, PARENT_BYTES, STACK_CAPACITY};
use crate::hash::BlobHash;

/// Size in bytes of the post-order outboard of a blob of `size` bytes.
pub fn outboard_size(size: u64) -> u64 {
    BaoTree::new(size, block_size()).outboard_size()
}

/// Byte offset of `node`'s parent entry in the post-order outboard of a blob of `size` bytes, or
/// `None` for nodes the outboard does not store.
pub fn outboard_offset(size: u64, node: TreeNode) -> Option<u64> {
    BaoTree::new(size, block_size())
        .post_order_offset(node)
        .map(|offset| offset.value() * PARENT_BYTES as u64)
}

/// A blob's root hash and its post-order outboard.
#[derive(Clone, PartialEq, Eq)]
pub struct Outboard {
    /// The blob's BLAKE3 hash (the root of the tree).
    pub hash: BlobHash,
    /// The blob's size in bytes.
    pub size: u64,
    /// Parent entries in post order, exactly [`outboard_size`] bytes.
    pub data: Vec<u8>,
}

impl fmt::Debug for Outboard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outboard")
            .field("hash", &self.hash)
            .field("size", &self.size)
            .field("outboard_bytes", &self.data.len())
            .finish()
    }
}

/// Hashes `data` and builds its post-order outboard in one pass, into a buffer sized up front.
pub fn compute_outboard(data: &[u8]) -> Outboard {
    let size = data.len() as u64;
    let tree = BaoTree::new(size, block_size());
    // The outboard of anything that fits in memory fits in memory: it is 0.4 % of it.
    let mut outboard = Vec::with_capacity(tree.outboard_size() as usize);
    let mut stack: Vec<blake3::Hash> = Vec::with_capacity(STACK_CAPACITY);
    for item in tree.post_order_chunks_iter() {
        match item {
            BaoChunk::Parent { is_root, .. } => {
                // Post order yields both children before their parent, so two hashes are there.
                let right = stack.pop().expect("post order: right child before parent");
                let left = stack.pop().expect("post order: left child before parent");
                outboard.extend_from_slice(left.as_bytes());
                outboard.extend_from_slice(right.as_bytes());
                stack.push(parent_cv(&left, &right, is_root));
            }
            BaoChunk::Leaf {
                start_chunk,
                size,
                is_root,
                ..
            } => {
                let start = start_chunk.to_bytes() as usize;
                stack.push(hash_subtree(
                    start_chunk,
                    &data[start..start + size],
                    is_root,
                ));
            }
        }
    }
    let root = stack.pop().expect("post order ends with the root");
    Outboard {
        hash: BlobHash::from(root),
        size,
        data: outboard,
    }
}
