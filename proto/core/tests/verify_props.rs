//! Property tests of verified streaming: round trips over random sizes and ranges, and that
//! corrupt, truncated or foreign streams are refused without handing out a wrong byte.

use proptest::prelude::*;
use proto_core::verify::{
    self, compute_outboard, encode_ranges, encode_ranges_from, encoded_len, group_count,
    DecodeItem, Decoder, GroupRanges, VerifyError, GROUP_BYTES, SIZE_HEADER_BYTES,
};
use proto_core::BlobHash;

/// Deterministic pseudo-random bytes (xorshift), so proptest shrinks the seed, not a buffer.
fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2).wrapping_add(1);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&bytes[..take]);
    }
    out
}

fn sizes() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(16383),
        Just(16384),
        Just(16385),
        Just(2 * 16384),
        1usize..400_000,
        Just(4 * 1024 * 1024 + 4321),
    ]
}

fn ranges() -> impl Strategy<Value = GroupRanges> {
    prop_oneof![
        Just(GroupRanges::all()),
        (0u64..40).prop_map(GroupRanges::from_group),
        prop::collection::vec((0u64..40, 1u64..6), 1..5).prop_map(|runs| {
            runs.into_iter()
                .fold(GroupRanges::empty(), |acc, (start, len)| {
                    acc.union(&GroupRanges::groups(start..start + len))
                })
        }),
    ]
}

/// What a decoder yielded, item by item, with the stream span each item came from.
#[derive(Debug)]
struct Decoded {
    groups: Vec<(u64, Vec<u8>)>,
    parents: Vec<(Option<u64>, [u8; 64])>,
    /// (stream start, stream end, Some(group) for a group item, None for a parent or header).
    layout: Vec<(usize, usize, Option<u64>)>,
    result: Result<u64, VerifyError>,
}

/// Drives a decoder over `stream` by hand, the way a network task would.
fn decode(stream: &[u8], decoder: Decoder) -> Decoded {
    let mut decoder = decoder;
    let mut out = Decoded {
        groups: Vec::new(),
        parents: Vec::new(),
        layout: Vec::new(),
        result: Ok(0),
    };
    let mut at = 0;
    while let Some(needed) = decoder.needed() {
        if at + needed > stream.len() {
            break;
        }
        let bytes = &stream[at..at + needed];
        match decoder.push(bytes) {
            Ok(DecodeItem::Size(_)) => out.layout.push((at, at + needed, None)),
            Ok(DecodeItem::Parent(parent)) => {
                out.parents.push((parent.outboard_offset(), *parent.pair()));
                out.layout.push((at, at + needed, None));
            }
            Ok(DecodeItem::Group(group)) => {
                out.groups.push((group.index(), group.data().to_vec()));
                out.layout.push((at, at + needed, Some(group.index())));
            }
            Err(error) => {
                out.result = Err(error);
                return out;
            }
        }
        at += needed;
    }
    out.result = decoder.finish();
    if out.result.is_ok() && at != stream.len() {
        out.result = Err(VerifyError::TrailingBytes {
            extra: stream.len() - at,
        });
    }
    out
}

fn assert_groups_match(groups: &[(u64, Vec<u8>)], data: &[u8]) -> Result<(), TestCaseError> {
    for (index, bytes) in groups {
        let start = (*index * GROUP_BYTES) as usize;
        prop_assert_eq!(
            &data[start..start + bytes.len()],
            &bytes[..],
            "group {}",
            index
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn round_trip_any_size_and_ranges(len in sizes(), seed in any::<u64>(), ranges in ranges()) {
        let data = blob(len, seed);
        let size = len as u64;
        let outboard = compute_outboard(&data);
        prop_assert_eq!(outboard.hash, BlobHash::of(&data));
        let mut stream = Vec::with_capacity(encoded_len(size, &ranges) as usize);
        let written = encode_ranges(&data, &outboard.data, outboard.hash, &ranges, &mut stream).unwrap();
        prop_assert_eq!(written, stream.len() as u64);
        prop_assert_eq!(written, encoded_len(size, &ranges));

        let decoded = decode(&stream, Decoder::new(outboard.hash, ranges.clone()));
        prop_assert_eq!(decoded.result.unwrap(), size);
        let expected: Vec<u64> = ranges.normalized(size).iter_groups(size).collect();
        let got: Vec<u64> = decoded.groups.iter().map(|(i, _)| *i).collect();
        prop_assert_eq!(got, expected);
        assert_groups_match(&decoded.groups, &data)?;

        // Cut-through: a holder of only these groups and the parents that came with them can
        // serve them again, byte for byte.
        let mut partial_data = vec![0u8; len];
        for (index, bytes) in &decoded.groups {
            let start = (*index * GROUP_BYTES) as usize;
            partial_data[start..start + bytes.len()].copy_from_slice(bytes);
        }
        let mut partial_outboard = vec![0u8; verify::outboard_size(size) as usize];
        for (offset, pair) in &decoded.parents {
            if let Some(offset) = offset {
                partial_outboard[*offset as usize..*offset as usize + 64].copy_from_slice(pair);
            }
        }
        let present: GroupRanges = decoded.groups.iter().map(|(i, _)| *i).collect();
        let servable = verify::servable_ranges(&ranges, &present, size);
        prop_assert_eq!(&servable, &ranges.normalized(size));
        let mut again = Vec::new();
        encode_ranges_from(&partial_data[..], &partial_outboard[..], outboard.hash, size, &servable, &mut again).unwrap();
        prop_assert_eq!(again, stream);
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused_and_names_its_group(
        len in 1usize..300_000,
        seed in any::<u64>(),
        position in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let data = blob(len, seed);
        let outboard = compute_outboard(&data);
        let mut stream = Vec::new();
        encode_ranges(&data, &outboard.data, outboard.hash, &GroupRanges::all(), &mut stream).unwrap();
        let clean = decode(&stream, Decoder::new(outboard.hash, GroupRanges::all()));
        prop_assert!(clean.result.is_ok());

        let flip = position.index(stream.len());
        stream[flip] ^= 1 << bit;
        let decoded = decode(&stream, Decoder::new(outboard.hash, GroupRanges::all()));
        prop_assert!(decoded.result.is_err(), "flip at {} accepted", flip);
        // Nothing wrong was ever handed out.
        assert_groups_match(&decoded.groups, &data)?;

        let (start, _, item_group) = *clean
            .layout
            .iter()
            .find(|(start, end, _)| (*start..*end).contains(&flip))
            .unwrap();
        let error = decoded.result.unwrap_err();
        if start < SIZE_HEADER_BYTES {
            // A wrong size header changes the tree: some later check fails.
            return Ok(());
        }
        match item_group {
            Some(group) => {
                prop_assert!(
                    matches!(error, VerifyError::GroupMismatch { group: g, .. } if g == group),
                    "flip in group {} gave {:?}", group, error
                );
                prop_assert!(decoded.groups.iter().all(|(i, _)| *i != group));
            }
            None => {
                prop_assert!(matches!(error, VerifyError::ParentMismatch { .. }), "{:?}", error);
                // No group under the bad parent was yielded.
                let bad = error.group().unwrap();
                prop_assert!(decoded.groups.iter().all(|(i, _)| *i < bad));
            }
        }
    }

    #[test]
    fn a_truncated_stream_is_refused(len in 0usize..300_000, seed in any::<u64>(), cut in any::<prop::sample::Index>(), ranges in ranges()) {
        let data = blob(len, seed);
        let outboard = compute_outboard(&data);
        let mut stream = Vec::new();
        encode_ranges(&data, &outboard.data, outboard.hash, &ranges, &mut stream).unwrap();
        let cut = cut.index(stream.len());
        let decoded = decode(&stream[..cut], Decoder::new(outboard.hash, ranges.clone()));
        assert_groups_match(&decoded.groups, &data)?;
        let error = decoded.result.unwrap_err();
        if cut < SIZE_HEADER_BYTES {
            prop_assert!(matches!(error, VerifyError::TruncatedHeader));
        } else {
            prop_assert!(matches!(error, VerifyError::Truncated { .. }), "{:?}", error);
            let missing = error.group().unwrap();
            prop_assert!(decoded.groups.iter().all(|(i, _)| *i <= missing));
        }

        // The reader-based helper says the same.
        let result = verify::decode_from_reader(&stream[..cut], outboard.hash, ranges, |_| {});
        let truncated = matches!(result, Err(VerifyError::Truncated { .. } | VerifyError::TruncatedHeader));
        prop_assert!(truncated, "{:?}", result);
    }

    #[test]
    fn a_stream_for_another_blob_yields_nothing(len in 0usize..300_000, seed in any::<u64>(), other_len in 0usize..300_000, same_size in any::<bool>(), ranges in ranges()) {
        let data = blob(len, seed);
        let other = if same_size && len > 0 {
            let mut other = data.clone();
            other[len / 2] ^= 0x80;
            other
        } else {
            blob(other_len, seed.wrapping_add(1))
        };
        prop_assume!(other != data);
        let outboard = compute_outboard(&data);
        let mut stream = Vec::new();
        encode_ranges(&data, &outboard.data, outboard.hash, &ranges, &mut stream).unwrap();
        let decoded = decode(&stream, Decoder::new(BlobHash::of(&other), ranges));
        prop_assert!(decoded.result.is_err());
        prop_assert!(decoded.groups.is_empty(), "yielded {} groups of a foreign stream", decoded.groups.len());
    }
}

#[test]
fn outboard_fraction_for_16_mib_and_1_gib() {
    for (name, size) in [("16 MiB", 16u64 << 20), ("1 GiB", 1u64 << 30)] {
        let fraction = verify::outboard_size(size) as f64 / size as f64;
        println!(
            "outboard for {name}: {} bytes = {:.4} % of the data",
            verify::outboard_size(size),
            fraction * 100.0
        );
        assert!((0.0038..0.0040).contains(&fraction), "{name}: {fraction}");
    }
    // The real thing, not just the formula.
    let data = blob(16 << 20, 7);
    let outboard = compute_outboard(&data);
    assert_eq!(outboard.data.len() as u64, verify::outboard_size(16 << 20));
    assert_eq!(group_count(16 << 20), 1024);
}

#[test]
fn ranges_past_the_end_prove_the_size() {
    let data = blob(5 * GROUP_BYTES as usize + 99, 3);
    let outboard = compute_outboard(&data);
    let mut stream = Vec::new();
    let far = GroupRanges::from_group(1000);
    encode_ranges(&data, &outboard.data, outboard.hash, &far, &mut stream).unwrap();
    let mut decoder = Decoder::new(outboard.hash, far);
    let mut at = 0;
    let mut groups = Vec::new();
    while let Some(n) = decoder.needed() {
        if let DecodeItem::Group(group) = decoder.push(&stream[at..at + n]).unwrap() {
            groups.push(group.index());
        }
        at += n;
    }
    assert_eq!(groups, vec![5]);
    assert!(decoder.size_verified());
    assert_eq!(decoder.finish().unwrap(), data.len() as u64);
}

#[test]
fn trailing_bytes_after_a_complete_stream_are_refused() {
    let data = blob(20_000, 9);
    let outboard = compute_outboard(&data);
    let mut stream = Vec::new();
    encode_ranges(
        &data,
        &outboard.data,
        outboard.hash,
        &GroupRanges::all(),
        &mut stream,
    )
    .unwrap();
    let mut decoder = Decoder::new(outboard.hash, GroupRanges::all());
    let mut at = 0;
    while let Some(n) = decoder.needed() {
        decoder.push(&stream[at..at + n]).unwrap();
        at += n;
    }
    assert!(matches!(
        decoder.push(b"junk"),
        Err(VerifyError::TrailingBytes { extra: 4 })
    ));
}

#[test]
fn a_corrupt_local_copy_is_not_served() {
    let mut data = blob(100_000, 11);
    let outboard = compute_outboard(&data);
    data[3 * GROUP_BYTES as usize + 5] ^= 1;
    let mut stream = Vec::new();
    let error = encode_ranges(
        &data,
        &outboard.data,
        outboard.hash,
        &GroupRanges::all(),
        &mut stream,
    )
    .unwrap_err();
    assert!(
        matches!(error, verify::EncodeError::DataCorrupt { group: 3, .. }),
        "{error}"
    );
}
