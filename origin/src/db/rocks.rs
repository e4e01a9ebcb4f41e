//! The embedded backend: one RocksDB under the origin's home, one column family per table.
//! One process owns it (RocksDB's lock), so a change never conflicts: its token's revision is
//! always 0, and the last audit sequence number is kept in memory from the open on.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rocksdb::{
    ColumnFamilyDescriptor, DBCompressionType, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use super::{Backend, DbError, Entries, Leadership, Token, Write, Written, AUDIT, TABLES};

/// The embedded RocksDB.
pub struct RocksBackend {
    db: DB,
    path: PathBuf,
    /// The last audit sequence number written.
    last_audit: Mutex<u64>,
    /// This process's announcements (one origin holds the database).
    live: Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
    /// The elections this process campaigned in (it leads them all: one origin).
    elections: Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
}

impl RocksBackend {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_compression_type(DBCompressionType::None);
        options.set_keep_log_file_num(4);
        let families = TABLES.iter().map(|name| {
            let mut cf = Options::default();
            cf.set_compression_type(DBCompressionType::None);
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&options, path, families).map_err(|e| DbError::Open {
            path: path.to_owned(),
            message: e.into_string(),
        })?;
        let backend = Self {
            db,
            path: path.to_owned(),
            last_audit: Mutex::new(0),
            live: Mutex::default(),
            elections: Mutex::default(),
        };
        let last = backend.last_audit_seq()?;
        *backend.lock_last() = last;
        Ok(backend)
    }

    fn lock_last(&self) -> std::sync::MutexGuard<'_, u64> {
        self.last_audit.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cf(&self, table: &'static str) -> Result<&rocksdb::ColumnFamily, DbError> {
        self.db.cf_handle(table).ok_or_else(|| DbError::Rocks {
            op: "open table",
            message: format!("table `{table}` is missing"),
        })
    }

    fn last_audit_seq(&self) -> Result<u64, DbError> {
        let cf = self.cf(AUDIT)?;
        match self.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(0),
            Some(item) => {
                let (key, _) = item.map_err(|e| rocks("scan", e))?;
                let bytes: [u8; 8] = key.as_ref().try_into().map_err(|_| DbError::Corrupt {
                    table: AUDIT,
                    key: hex::encode(&key),
                    why: "an audit key is not an 8-byte sequence number".into(),
                })?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }
}

impl Backend for RocksBackend {
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.db
            .get_cf(self.cf(table)?, key)
            .map_err(|e| rocks("read", e))
    }

    fn scan(
        &self,
        table: &'static str,
        newest_first: bool,
        limit: usize,
    ) -> Result<Entries, DbError> {
        let mode = if newest_first {
            IteratorMode::End
        } else {
            IteratorMode::Start
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(table)?, mode) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(|e| rocks("scan", e))?;
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    fn begin(&self) -> Result<Token, DbError> {
        Ok(Token {
            revision: 0,
            last_audit: *self.lock_last(),
        })
    }

    fn write(
        &self,
        token: Token,
        writes: &[Write],
        audit: Option<(u64, &[u8])>,
    ) -> Result<Written, DbError> {
        let mut last = self.lock_last();
        if token.last_audit < *last {
            // Another change of this process committed since the token.
            return Ok(Written::Conflict);
        }
        let mut batch = WriteBatch::default();
        for write in writes {
            match write {
                Write::Put { table, key, value } => batch.put_cf(self.cf(table)?, key, value),
                Write::Delete { table, key } => batch.delete_cf(self.cf(table)?, key),
            }
        }
        if let Some((seq, value)) = audit {
            batch.put_cf(self.cf(AUDIT)?, seq.to_be_bytes(), value);
        }
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .write_opt(batch, &options)
            .map_err(|e| rocks("write", e))?;
        *last = audit.map_or(token.last_audit, |(seq, _)| seq);
        Ok(Written::Committed)
    }

    fn health(&self) -> Result<Vec<String>, DbError> {
        Ok(vec![format!("rocksdb at {}: open", self.path.display())])
    }

    fn announce(&self, entries: &[(String, Vec<u8>)]) -> Result<(), DbError> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(entries.iter().cloned());
        Ok(())
    }

    fn live(&self) -> Result<Entries, DbError> {
        Ok(self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
            .collect())
    }

    fn campaign(
        &self,
        name: &str,
        value: &[u8],
        _wait: std::time::Duration,
    ) -> Result<Option<Leadership>, DbError> {
        self.elections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), value.to_vec());
        Ok(Some(Leadership {
            key: name.as_bytes().to_vec(),
        }))
    }

    fn leader(&self, name: &str) -> Result<Option<(Leadership, Vec<u8>)>, DbError> {
        Ok(self
            .elections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|value| {
                (
                    Leadership {
                        key: name.as_bytes().to_vec(),
                    },
                    value.clone(),
                )
            }))
    }
}

fn rocks(op: &'static str, error: rocksdb::Error) -> DbError {
    DbError::Rocks {
        op,
        message: error.into_string(),
    }
}
