//! The one walk of a blob's hash tree that the encoder and the decoder share.
//!
//! A response stream carries, in pre order, every parent pair on the path to each requested
//! group and then the group's bytes. Whoever writes or reads one keeps a stack of the hashes
//! still to be matched, the blob's root first: a parent pair must hash to the top of the stack
//! and pushes the children the stream goes on to; a group must hash to the top of the stack.
//! [`HashStack`] is that walk, so the encoder (checking what it sends) and the decoder (checking
//! what it receives) cannot disagree about it.

use bao_tree::iter::BaoChunk;
use bao_tree::{ChunkNum, TreeNode};

use super::{CHUNKS_PER_GROUP, PARENT_BYTES, STACK_CAPACITY};
use crate::hash::BlobHash;

/// The hashes a pre-order walk of a blob's tree still has to match, the next one on top.
pub(super) struct HashStack(Vec<blake3::Hash>);

/// An item did not hash to what the walk expected of it, or the walk expected nothing more.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Mismatch;

impl HashStack {
    /// A walk from the root of the blob named `hash`.
    pub(super) fn new(hash: BlobHash) -> Self {
        let mut stack = Vec::with_capacity(STACK_CAPACITY);
        stack.push(hash.into());
        HashStack(stack)
    }

    /// Checks a parent pair against the next expected hash, then expects the children the
    /// stream descends into (`left` and `right` say which: the left one comes first).
    pub(super) fn parent(
        &mut self,
        pair: &[u8; PARENT_BYTES],
        is_root: bool,
        left: bool,
        right: bool,
    ) -> Result<(), Mismatch> {
        let (left_hash, right_hash) = split_pair(pair);
        let expected = self.0.pop().ok_or(Mismatch)?;
        if parent_cv(&left_hash, &right_hash, is_root) != expected {
            return Err(Mismatch);
        }
        if right {
            self.0.push(right_hash);
        }
        if left {
            self.0.push(left_hash);
        }
        Ok(())
    }

    /// Checks a group's bytes (the subtree starting at `start_chunk`) against the next expected
    /// hash.
    pub(super) fn group(
        &mut self,
        start_chunk: ChunkNum,
        data: &[u8],
        is_root: bool,
    ) -> Result<(), Mismatch> {
        let expected = self.0.pop().ok_or(Mismatch)?;
        if hash_subtree(start_chunk, data, is_root) != expected {
            return Err(Mismatch);
        }
        Ok(())
    }

    /// Moves past a group without hashing it, for data the caller already trusts.
    pub(super) fn skip_group(&mut self) -> Result<(), Mismatch> {
        self.0.pop().map(|_| ()).ok_or(Mismatch)
    }
}

/// The first group under `node`.
pub(super) fn first_group(node: TreeNode) -> u64 {
    node.chunk_range().start.0 / CHUNKS_PER_GROUP
}

/// The first group an item of a stream concerns.
pub(super) fn chunk_first_group(chunk: &BaoChunk) -> u64 {
    match chunk {
        BaoChunk::Parent { node, .. } => first_group(*node),
        BaoChunk::Leaf { start_chunk, .. } => start_chunk.0 / CHUNKS_PER_GROUP,
    }
}

fn split_pair(pair: &[u8; PARENT_BYTES]) -> (blake3::Hash, blake3::Hash) {
    let mut left = [0u8; 32];
    let mut right = [0u8; 32];
    left.copy_from_slice(&pair[..32]);
    right.copy_from_slice(&pair[32..]);
    (blake3::Hash::from(left), blake3::Hash::from(right))
}

/// Chaining value (or, for the root, the hash) of the subtree of `data` starting at `start_chunk`.
/// The same computation as bao-tree's, through blake3's public `hazmat` API.
pub(super) fn hash_subtree(start_chunk: ChunkNum, data: &[u8], is_root: bool) -> blake3::Hash {
    use blake3::hazmat::HasherExt;
    if is_root {
        blake3::hash(data)
    } else {
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(start_chunk.to_bytes());
        hasher.update(data);
        blake3::Hash::from(hasher.finalize_non_root())
    }
}

/// Hash of a parent node from its children's chaining values.
pub(super) fn parent_cv(left: &blake3::Hash, right: &blake3::Hash, is_root: bool) -> blake3::Hash {
    use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, Mode};
    if is_root {
        merge_subtrees_root(left.as_bytes(), right.as_bytes(), Mode::Hash)
    } else {
        blake3::Hash::from(merge_subtrees_non_root(
            left.as_bytes(),
            right.as_bytes(),
            Mode::Hash,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_refuses_a_wrong_pair_a_wrong_group_and_anything_after_the_end() {
        // Two groups: the root is a parent of two leaves.
        let data = vec![7u8; 2 * super::super::GROUP_BYTES as usize];
        let outboard = super::super::compute_outboard(&data);
        let pair: [u8; PARENT_BYTES] = outboard.data[..PARENT_BYTES].try_into().expect("pair");
        let half = super::super::GROUP_BYTES as usize;
        let second = ChunkNum(CHUNKS_PER_GROUP);

        let mut walk = HashStack::new(outboard.hash);
        walk.parent(&pair, true, true, true).expect("root pair");
        walk.group(ChunkNum(0), &data[..half], false)
            .expect("left group");
        walk.group(second, &data[half..], false)
            .expect("right group");
        assert_eq!(walk.skip_group(), Err(Mismatch), "nothing left to match");

        let mut flipped = pair;
        flipped[0] ^= 1;
        let mut walk = HashStack::new(outboard.hash);
        assert_eq!(walk.parent(&flipped, true, true, true), Err(Mismatch));

        let mut walk = HashStack::new(outboard.hash);
        walk.parent(&pair, true, true, true).expect("root pair");
        let mut wrong = data[..half].to_vec();
        wrong[100] ^= 1;
        assert_eq!(walk.group(ChunkNum(0), &wrong, false), Err(Mismatch));
    }
}
