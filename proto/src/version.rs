//! The one ordering of bundle versions, used wherever a version is compared: the newest
//! version a policy accepts, `name>=version`, `NAME` meaning the newest, a rollout's refusal to
//! downgrade. Pure: no I/O.
//!
//! # The rule
//!
//! 1. **Both versions are semver** (after completing `X` to `X.0.0` and `X.Y` to `X.Y.0`, so
//!    `2`, `2.0` and `2.0-rc1` count): they compare by semver precedence, with the `semver`
//!    crate. A pre-release sorts before its release: `2.0-rc1` < `2.0` < `2.0.1` < `2.10`;
//!    `1.0.0-alpha` < `1.0.0-alpha.1` < `1.0.0-beta.2` < `1.0.0-beta.11` < `1.0.0-rc.1`.
//! 2. **Otherwise** Debian's ordering applies (`dpkg --compare-versions`):
//!    `[epoch:]upstream[-revision]`; the epoch compares as a number, then upstream, then revision,
//!    each by runs: digit runs compare as numbers of any length (`1.10` > `1.9`), other runs
//!    character by character with letters before other characters, and `~` before everything,
//!    even the end: `2.0~rc1` < `2.0` < `2.0a` < `2.0.1`, `1:1.0` > `9.0`.
//!    When one side is semver and the other is not, the semver side takes part as its
//!    `major.minor.patch`, followed by `~` when it is a pre-release: `2.0~beta` < `2.0-rc1` <
//!    `2.0`; a Debian version and a semver one that still tie order the Debian one first.
//! 3. Versions that tie under the rules above but are different strings (`1.0` and `1.0.0`,
//!    `1.01` and `1.1`) are ordered by their bytes, so only identical strings are equal.
//!
//! The result is a total order (antisymmetric and transitive on every pair of strings, tested
//! with random strings), so sorting by it never misbehaves.
//!
//! Note what rule 1 implies for Debian-style revisions: `1.0-1` parses as semver, so it is a
//! pre-release of `1.0` and sorts before it. Give such versions an epoch (`0:1.0-1`) or use
//! `1.0+1` to get the Debian meaning.

use std::cmp::Ordering;

/// Orders two version strings by the rule in the [module documentation](self).
pub fn compare_versions(left: &str, right: &str) -> Ordering {
    let left_semver = parse_semver(left);
    let right_semver = parse_semver(right);
    let order = match (&left_semver, &right_semver) {
        (Some(l), Some(r)) => l.cmp(r),
        _ => {
            let l = DebianParts::of(left, left_semver.as_ref());
            let r = DebianParts::of(right, right_semver.as_ref());
            l.compare(&r)
                // A tie between a Debian version and a semver one: the Debian one first.
                .then_with(|| left_semver.is_some().cmp(&right_semver.is_some()))
        }
    };
    order.then_with(|| left.cmp(right))
}

/// The item of `items` with the newest version by [`compare_versions`]; the last of them when
/// several have the same version (for a catalog in publication order: the latest published).
pub fn newest_by<'a, T: 'a>(
    items: impl IntoIterator<Item = &'a T>,
    version_of: impl Fn(&T) -> &str,
) -> Option<&'a T> {
    items
        .into_iter()
        .max_by(|a, b| compare_versions(version_of(a), version_of(b)))
}

/// Debian's ordering alone (`dpkg --compare-versions`): epoch, then upstream, then revision.
/// Different strings may compare equal (`1.01` and `1.1`); [`compare_versions`] breaks such
/// ties.
pub fn compare_debian(left: &str, right: &str) -> Ordering {
    DebianParts::of(left, None).compare(&DebianParts::of(right, None))
}

/// `text` as a semver version, completing `X` and `X.Y` with zeros; `None` if it is not one.
pub fn parse_semver(text: &str) -> Option<semver::Version> {
    let core_end = text.find(['-', '+']).unwrap_or(text.len());
    let (core, rest) = text.split_at(core_end);
    let completed = match core.matches('.').count() {
        0 => format!("{core}.0.0{rest}"),
        1 => format!("{core}.0{rest}"),
        _ => return semver::Version::parse(text).ok(),
    };
    semver::Version::parse(&completed).ok()
}

/// A version split the Debian way. For a semver version, the parts it takes part with when
/// compared against a Debian one.
struct DebianParts<'a> {
    epoch: &'a str,
    upstream: std::borrow::Cow<'a, str>,
    revision: &'a str,
}

impl<'a> DebianParts<'a> {
    fn of(text: &'a str, semver: Option<&semver::Version>) -> Self {
        if let Some(version) = semver {
            let tilde = if version.pre.is_empty() { "" } else { "~" };
            return Self {
                epoch: "0",
                upstream: format!(
                    "{}.{}.{}{tilde}",
                    version.major, version.minor, version.patch
                )
                .into(),
                revision: "",
            };
        }
        let (epoch, rest) = match text.split_once(':') {
            Some((epoch, rest))
                if !epoch.is_empty() && epoch.bytes().all(|b| b.is_ascii_digit()) =>
            {
                (epoch, rest)
            }
            _ => ("0", text),
        };
        let (upstream, revision) = rest.rsplit_once('-').unwrap_or((rest, ""));
        Self {
            epoch,
            upstream: upstream.into(),
            revision,
        }
    }

    fn compare(&self, other: &Self) -> Ordering {
        compare_numbers(self.epoch.as_bytes(), other.epoch.as_bytes())
            .then_with(|| compare_runs(self.upstream.as_bytes(), other.upstream.as_bytes()))
            .then_with(|| compare_runs(self.revision.as_bytes(), other.revision.as_bytes()))
    }
}

/// dpkg's `verrevcmp`: alternating non-digit runs (by [`weight`]) and digit runs (as numbers).
fn compare_runs(left: &[u8], right: &[u8]) -> Ordering {
    let (mut l, mut r) = (0, 0);
    while l < left.len() || r < right.len() {
        while left.get(l).is_some_and(|c| !c.is_ascii_digit())
            || right.get(r).is_some_and(|c| !c.is_ascii_digit())
        {
            let (lw, rw) = (weight(left.get(l)), weight(right.get(r)));
            if lw != rw {
                return lw.cmp(&rw);
            }
            // Equal weights here mean the same non-digit byte on both sides.
            l += 1;
            r += 1;
        }
        let l_end = digits_end(left, l);
        let r_end = digits_end(right, r);
        match compare_numbers(&left[l..l_end], &right[r..r_end]) {
            Ordering::Equal => {}
            order => return order,
        }
        (l, r) = (l_end, r_end);
    }
    Ordering::Equal
}

/// The sort weight of a byte in a non-digit run: `~` first, then the end of the run (or a
/// digit), then letters, then everything else.
fn weight(byte: Option<&u8>) -> i32 {
    match byte {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(*c),
        Some(c) => i32::from(*c) + 256,
    }
}

fn digits_end(text: &[u8], from: usize) -> usize {
    from + text[from..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count()
}

/// Two runs of ASCII digits as numbers of any length (`""` is zero).
fn compare_numbers(left: &[u8], right: &[u8]) -> Ordering {
    let strip = |digits: &[u8]| -> usize { digits.iter().take_while(|&&c| c == b'0').count() };
    let (left, right) = (&left[strip(left)..], &right[strip(right)..]);
    left.len().cmp(&right.len()).then_with(|| left.cmp(right))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every pair in `ascending` (strictly increasing) compares as listed, both ways round.
    fn assert_ascending(ascending: &[&str], compare: fn(&str, &str) -> Ordering) {
        for (i, left) in ascending.iter().enumerate() {
            for (j, right) in ascending.iter().enumerate() {
                assert_eq!(
                    compare(left, right),
                    i.cmp(&j),
                    "{left} vs {right} (expected {:?})",
                    i.cmp(&j)
                );
            }
        }
    }

    #[test]
    fn release_candidates_sort_before_their_release() {
        assert_eq!(compare_versions("2.0-rc1", "2.0"), Ordering::Less);
        assert_eq!(compare_versions("2.0~rc1", "2.0"), Ordering::Less);
        assert_eq!(compare_versions("2.0", "2.0-rc1"), Ordering::Greater);
        let published = [("2.0", 1), ("2.0-rc1", 2), ("1.9", 3), ("2.0", 4)];
        assert_eq!(newest_by(&published, |p| p.0), Some(&("2.0", 4)));
        assert_eq!(newest_by(&published[..0], |p| p.0), None);
    }

    #[test]
    fn semver_versions_follow_semver_precedence() {
        // The example of the semver specification, section 11, with shortened forms.
        assert_ascending(
            &[
                "1.0.0-alpha",
                "1.0.0-alpha.1",
                "1.0.0-alpha.beta",
                "1.0.0-beta",
                "1.0.0-beta.2",
                "1.0.0-beta.11",
                "1.0.0-rc.1",
                "1",
                "1.0.0",
                "1.0.1",
                "1.2",
                "1.9",
                "1.10",
                "2.0-rc1",
                "2.0-rc2",
                "2.0",
                "2.0.0",
                "10",
            ],
            compare_versions,
        );
    }

    #[test]
    fn semver_is_recognised_with_one_or_two_numbers() {
        for (text, expected) in [
            ("2", "2.0.0"),
            ("2.1", "2.1.0"),
            ("2.1.3", "2.1.3"),
            ("2.0-rc1", "2.0.0-rc1"),
            ("2+build.5", "2.0.0+build.5"),
        ] {
            let parsed = parse_semver(text).map(|v| v.to_string());
            assert_eq!(parsed.as_deref(), Some(expected), "{text}");
        }
        for text in ["", "v2", "2.0~rc1", "1:2.0", "2.0.0.1", "01.2", "2.x", "2."] {
            assert_eq!(parse_semver(text), None, "{text} is not semver");
        }
    }

    #[test]
    fn debian_versions_follow_dpkg() {
        // Cases from dpkg's own test suite and Debian policy 5.6.12.
        assert_ascending(
            &[
                "1.0~~",
                "1.0~~a",
                "1.0~",
                "1.0",
                "1.0a",
                "1.0+",
                "1.0.1",
                "1.9",
                "1.10",
                "1:0.1",
                "1:1.0~rc1",
                "1:1.0",
                "1:1.0-1",
                "1:1.0-1.1",
                "1:1.0-2",
                "2:0",
            ],
            compare_debian,
        );
        for (left, right) in [
            ("1.01", "1.1"),
            ("1.0", "1.0-0"),
            ("0:1.0", "1.0"),
            ("00", "0"),
        ] {
            assert_eq!(
                compare_debian(left, right),
                Ordering::Equal,
                "{left} = {right}"
            );
        }
        assert_eq!(
            compare_debian("123456789012345678901234567890", "99"),
            Ordering::Greater
        );
    }

    #[test]
    fn mixed_schemes_compare_by_release_numbers_first() {
        assert_ascending(
            &[
                "1.9~rc1",
                "1.9",
                "1.10~beta",
                "1.10.0-rc1",
                "1.10",
                "1.10+debian",
                "1:0.1",
            ],
            compare_versions,
        );
    }

    #[test]
    fn only_identical_strings_are_equal() {
        for (left, right) in [
            ("1.0", "1.0.0"),
            ("1.01", "1.1"),
            ("1.0", "1.0-0"),
            ("", "0"),
        ] {
            let order = compare_versions(left, right);
            assert_ne!(order, Ordering::Equal, "{left} vs {right}");
            assert_eq!(compare_versions(right, left), order.reverse());
        }
        assert_eq!(compare_versions("1.0", "1.0"), Ordering::Equal);
    }

    #[test]
    fn a_semver_tie_broken_the_debian_way_stays_transitive() {
        // A cycle that a naive "semver when both parse, else dpkg" rule has: 2.0.0-rc1 < 2.0.0
        // by semver, yet 2.0.0 < 2.0.0-rc0~ < 2.0.0-rc1 by dpkg (revision `rc0~` vs `rc1`).
        let (a, b, c) = ("2.0.0-rc1", "2.0.0", "2.0.0-rc0~");
        let mut sorted = [b, c, a];
        sorted.sort_by(|x, y| compare_versions(x, y));
        for window in sorted.windows(2) {
            assert_eq!(compare_versions(window[0], window[1]), Ordering::Less);
        }
        assert_eq!(compare_versions(sorted[0], sorted[2]), Ordering::Less);
    }

    /// Version-like strings that mix both schemes and their corner cases.
    fn version() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9]{1,2}(\\.[0-9]{1,2}){0,3}",
            "[0-9]{1,2}(\\.[0-9]{1,2}){0,2}(-[0-9a-z.~-]{1,6})?(\\+[0-9a-z]{1,3})?",
            "([0-9]:)?[0-9]{1,2}(\\.[0-9a-z~+]{1,3}){0,3}(-[0-9a-z.~+]{1,4})?",
            "[0-9a-z.~:+-]{0,8}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn antisymmetric_and_equal_only_when_identical(a in version(), b in version()) {
            let forward = compare_versions(&a, &b);
            prop_assert_eq!(forward, compare_versions(&b, &a).reverse());
            prop_assert_eq!(forward == Ordering::Equal, a == b);
            prop_assert_eq!(compare_debian(&a, &b), compare_debian(&b, &a).reverse());
        }

        #[test]
        fn transitive(a in version(), b in version(), c in version()) {
            for (x, y, z) in [(&a, &b, &c), (&a, &c, &b), (&b, &a, &c), (&b, &c, &a), (&c, &a, &b), (&c, &b, &a)] {
                if compare_versions(x, y) != Ordering::Greater && compare_versions(y, z) != Ordering::Greater {
                    prop_assert_ne!(compare_versions(x, z), Ordering::Greater, "{} <= {} <= {}", x, y, z);
                }
                if compare_debian(x, y) != Ordering::Greater && compare_debian(y, z) != Ordering::Greater {
                    prop_assert_ne!(compare_debian(x, z), Ordering::Greater, "debian {} <= {} <= {}", x, y, z);
                }
            }
        }

        #[test]
        fn sorting_many_gives_a_chain(mut versions in proptest::collection::vec(version(), 0..40)) {
            versions.sort_by(|a, b| compare_versions(a, b));
            for window in versions.windows(2) {
                prop_assert_ne!(compare_versions(&window[0], &window[1]), Ordering::Greater);
            }
            for (i, x) in versions.iter().enumerate() {
                for y in &versions[i..] {
                    prop_assert_ne!(compare_versions(x, y), Ordering::Greater, "{} before {}", x, y);
                }
            }
        }
    }
}
