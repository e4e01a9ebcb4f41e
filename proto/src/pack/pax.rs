//! The pax extended header records this packer writes, and their strict reader. Pure.
//!
//! A record is `<length> <key>=<value>\n`, where the decimal length counts the whole record,
//! itself included, so values are arbitrary bytes (xattr values often hold newlines). Only two
//! kinds of key are written and accepted:
//!
//! - `mtime`: the modification time with nanoseconds, as `[-]<seconds>.<9 digits>`, written when
//!   the header's whole seconds do not say it all (a fraction, or a time before 1970);
//! - `SCHILY.xattr.<name>`: one extended attribute with its raw value, the key GNU tar and
//!   bsdtar use, so `tar --xattrs` reads them too.
//!
//! Records come in a fixed order (mtime, then xattrs sorted by name bytes), so a tree always
//! gives the same bytes.

/// Prefix of the key of an extended attribute record.
pub(super) const XATTR_KEY_PREFIX: &[u8] = b"SCHILY.xattr.";

/// Key of the modification time record.
const MTIME_KEY: &[u8] = b"mtime";

/// Longest xattr name Linux accepts, in bytes (`XATTR_NAME_MAX`).
pub(super) const MAX_XATTR_NAME_BYTES: usize = 255;

/// Largest xattr value Linux accepts, in bytes (`XATTR_SIZE_MAX`).
pub(super) const MAX_XATTR_VALUE_BYTES: usize = 64 * 1024;

/// Largest pax header accepted when unpacking, in bytes. Linux lists at most 64 KiB of names per
/// inode and most filesystems hold far less than this in values; the bound keeps a crafted
/// stream from making us allocate without limit.
pub(super) const MAX_PAX_HEADER_BYTES: u64 = 1024 * 1024;

const NANOS_PER_SEC: u32 = 1_000_000_000;

/// One extended attribute: its full name (`user.comment`, `security.capability`) and raw value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// A modification time: whole seconds since the epoch (negative before 1970) and nanoseconds
/// after them, always in `0..1_000_000_000`, as `stat` gives it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    /// From `st_mtime` and `st_mtime_nsec`.
    pub fn from_stat(secs: i64, nanos: i64) -> Self {
        Timestamp {
            secs,
            nanos: u32::try_from(nanos)
                .ok()
                .filter(|n| *n < NANOS_PER_SEC)
                .unwrap_or(0),
        }
    }

    /// The value of the header's unsigned mtime field: whole seconds, 0 before 1970 (the pax
    /// record then carries the real time).
    pub fn header_secs(self) -> u64 {
        u64::try_from(self.secs).unwrap_or(0)
    }

    /// Whether the header field alone loses something, so a pax `mtime` record is needed.
    fn needs_record(self) -> bool {
        self.nanos != 0 || self.secs < 0
    }

    /// `[-]<seconds>.<9 digits>`: the exact decimal value of `secs + nanos / 10^9`.
    fn to_decimal(self) -> String {
        if self.secs < 0 && self.nanos != 0 {
            // -2 s + 0.5 s is -1.5 s.
            let whole = -(self.secs + 1);
            format!("-{whole}.{:09}", NANOS_PER_SEC - self.nanos)
        } else {
            format!("{}.{:09}", self.secs, self.nanos)
        }
    }

    /// Parses `[-]<digits>[.<digits>]`; digits past the ninth of the fraction are dropped.
    fn from_decimal(text: &[u8]) -> Option<Self> {
        let (negative, text) = match text.strip_prefix(b"-") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, fraction) = match text.iter().position(|&b| b == b'.') {
            Some(dot) => (&text[..dot], &text[dot + 1..]),
            None => (text, &b""[..]),
        };
        if whole.is_empty() || !whole.iter().chain(fraction).all(u8::is_ascii_digit) {
            return None;
        }
        let whole: i64 = std::str::from_utf8(whole).ok()?.parse().ok()?;
        let mut nanos = 0u32;
        for i in 0..9 {
            nanos = nanos * 10 + fraction.get(i).map_or(0, |d| u32::from(d - b'0'));
        }
        Some(if !negative {
            Timestamp { secs: whole, nanos }
        } else if nanos == 0 {
            Timestamp {
                secs: whole.checked_neg()?,
                nanos: 0,
            }
        } else {
            Timestamp {
                secs: whole.checked_neg()?.checked_sub(1)?,
                nanos: NANOS_PER_SEC - nanos,
            }
        })
    }
}

/// What one pax header says about the entry that follows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct PaxAttributes {
    pub mtime: Option<Timestamp>,
    /// In the order recorded; names are unique.
    pub xattrs: Vec<Xattr>,
}

/// Checks that an xattr can be recorded and restored: a name Linux accepts that a pax key can
/// hold (no `=`), and a value within Linux's limit.
pub(super) fn check_xattr(name: &[u8], value: &[u8]) -> Result<(), String> {
    let shown = || String::from_utf8_lossy(name).into_owned();
    if name.is_empty() || name.len() > MAX_XATTR_NAME_BYTES {
        return Err(format!(
            "extended attribute name {:?} is empty or longer than {MAX_XATTR_NAME_BYTES} bytes",
            shown()
        ));
    }
    if name.contains(&b'=') || name.contains(&0) {
        return Err(format!(
            "extended attribute name {:?} contains `=` or NUL, which a pax record cannot hold",
            shown()
        ));
    }
    if value.len() > MAX_XATTR_VALUE_BYTES {
        return Err(format!(
            "extended attribute {:?} holds {} bytes, more than Linux's limit of {MAX_XATTR_VALUE_BYTES}",
            shown(),
            value.len()
        ));
    }
    Ok(())
}

/// The records for an entry with this mtime and these xattrs (sorted by name), empty when the
/// header says everything.
pub(super) fn encode_records(mtime: Timestamp, xattrs: &[Xattr]) -> Vec<u8> {
    let mut out = Vec::new();
    if mtime.needs_record() {
        push_record(&mut out, MTIME_KEY, mtime.to_decimal().as_bytes());
    }
    for xattr in xattrs {
        let key = [XATTR_KEY_PREFIX, &xattr.name].concat();
        push_record(&mut out, &key, &xattr.value);
    }
    out
}

/// Appends `<length> <key>=<value>\n`.
fn push_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // Space, `=` and newline, plus key and value; the length's own digits come on top.
    let rest = key.len() + value.len() + 3;
    let mut digits = 1;
    while decimal_digits(rest + digits) != digits {
        digits += 1;
    }
    out.extend_from_slice((rest + digits).to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn decimal_digits(mut n: usize) -> usize {
    let mut digits = 1;
    while n >= 10 {
        n /= 10;
        digits += 1;
    }
    digits
}

/// Parses the records of one pax header, refusing any key this packer does not write, a
/// duplicate, or a record whose length does not match its bytes.
pub(super) fn parse_records(mut data: &[u8]) -> Result<PaxAttributes, String> {
    let mut attributes = PaxAttributes::default();
    while !data.is_empty() {
        let space = data
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or("a pax record does not start with its length")?;
        let length: usize = std::str::from_utf8(&data[..space])
            .ok()
            .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse().ok())
            .ok_or("a pax record's length is not a decimal number")?;
        if length <= space + 1 || length > data.len() || data[length - 1] != b'\n' {
            return Err(format!(
                "a pax record claims {length} bytes, which do not end with a newline in the {} left",
                data.len()
            ));
        }
        let body = &data[space + 1..length - 1];
        data = &data[length..];
        let equals = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or("a pax record has no `=`")?;
        let (key, value) = (&body[..equals], &body[equals + 1..]);
        if key == MTIME_KEY {
            if attributes.mtime.is_some() {
                return Err("two mtime records describe one entry".into());
            }
            let mtime = Timestamp::from_decimal(value).ok_or_else(|| {
                format!(
                    "pax mtime {:?} is not a decimal time",
                    String::from_utf8_lossy(value)
                )
            })?;
            attributes.mtime = Some(mtime);
        } else if let Some(name) = key.strip_prefix(XATTR_KEY_PREFIX) {
            check_xattr(name, value)?;
            if attributes.xattrs.iter().any(|x| x.name == name) {
                return Err(format!(
                    "extended attribute {:?} is recorded twice for one entry",
                    String::from_utf8_lossy(name)
                ));
            }
            attributes.xattrs.push(Xattr {
                name: name.to_vec(),
                value: value.to_vec(),
            });
        } else {
            return Err(format!(
                "pax key {:?} is not one this packer writes",
                String::from_utf8_lossy(key)
            ));
        }
    }
    Ok(attributes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xattr(name: &[u8], value: &[u8]) -> Xattr {
        Xattr {
            name: name.to_vec(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn records_round_trip_with_binary_values_and_every_length_boundary() {
        let mut xattrs = vec![
            xattr(b"security.capability", b"\x01\x00\x00\x02\n=\n\0 "),
            xattr(b"user.empty", b""),
        ];
        // Values whose records straddle 9/10, 99/100 and 999/1000 bytes.
        for len in [0usize, 5, 6, 7, 80, 81, 82, 83, 84, 975, 976, 977, 978] {
            xattrs.push(xattr(
                format!("user.len{len:04}").as_bytes(),
                &vec![b'\n'; len],
            ));
        }
        for mtime in [
            Timestamp::default(),
            Timestamp {
                secs: 1_700_000_000,
                nanos: 123_456_789,
            },
            Timestamp {
                secs: -2,
                nanos: 500_000_000,
            },
            Timestamp { secs: -5, nanos: 0 },
            Timestamp { secs: -1, nanos: 1 },
        ] {
            let bytes = encode_records(mtime, &xattrs);
            let parsed = parse_records(&bytes).expect("parses");
            let expected_mtime = mtime.needs_record().then_some(mtime);
            assert_eq!(parsed.mtime, expected_mtime);
            assert_eq!(parsed.xattrs, xattrs);
        }
    }

    #[test]
    fn record_lengths_count_their_own_digits() {
        let mut out = Vec::new();
        push_record(&mut out, b"mtime", b"1.5");
        assert_eq!(out, b"13 mtime=1.5\n");
        let mut out = Vec::new();
        // Nine bytes without the length; one digit would make ten, which takes two.
        push_record(&mut out, b"k", b"vvvvv");
        assert_eq!(out, b"11 k=vvvvv\n");
    }

    #[test]
    fn decimal_times_parse_as_gnu_tar_writes_them() {
        let parse = |s: &str| Timestamp::from_decimal(s.as_bytes());
        assert_eq!(
            parse("1700000000.5"),
            Some(Timestamp {
                secs: 1_700_000_000,
                nanos: 500_000_000
            })
        );
        assert_eq!(parse("12"), Some(Timestamp { secs: 12, nanos: 0 }));
        assert_eq!(
            parse("-1.25"),
            Some(Timestamp {
                secs: -2,
                nanos: 750_000_000
            })
        );
        assert_eq!(
            parse("3.1234567899"),
            Some(Timestamp {
                secs: 3,
                nanos: 123_456_789
            })
        );
        for bad in ["", ".5", "1e9", "--1", "1.-5", "+1", "99999999999999999999"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unknown_keys_duplicates_and_bad_lengths_are_refused() {
        for bad in [
            &b"12 size=100\n"[..],
            b"20 path=/etc/passwd\n",
            b"13 mtime=1.5\n13 mtime=1.5\n",
            b"25 SCHILY.xattr.user.a=1\n25 SCHILY.xattr.user.a=2\n",
            b"14 mtime=1.5\n",
            b"13 mtime=1.5",
            b"x mtime=1.5\n",
            b"9999999999 mtime=1\n",
            b"19 SCHILY.xattr.=v\n",
            b"3 \n",
        ] {
            assert!(
                parse_records(bad).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
