//! The SQLite store's write-ahead log: what a response's end waits for.
//!
//! A response's settlement and spend record must survive a `kill -9` once
//! its client has the last byte. A SQLite commit per response did that at
//! the cost of a thread hop and several page writes each time; here the
//! durable step is one `write(2)` of a small frame to a file of Iris's own
//! (`<store file>.wal.<N>`), which the kernel keeps whatever happens to the
//! process: the same promise as SQLite's WAL with `synchronous = NORMAL`
//! (a power cut may lose the last writes). The frames are folded into the
//! SQLite file by the store's periodic flush, in one transaction that also
//! records which file it has absorbed; then the file is removed. At
//! startup, files the SQLite file has not absorbed are replayed into it
//! before anything else reads it.
//!
//! A frame holds account states (each account's whole state as of the
//! write, so the last frame of an account wins) and rows another part of
//! Iris rides in the store's transactions ([`super::Rider`]), as the values
//! of an `INSERT`. Its layout: a length and a CRC-32 of the payload, so a
//! write cut short at the end of a file (the process killed mid-write,
//! before its response ended) is recognised and left out.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::ToSql;
use rusqlite::types::{Value, ValueRef};

use crate::budget::window::{Bucket, Calendar, ClientState};

/// What a frame holds, item by item.
const STATE: u8 = 1;
const ROW: u8 = 2;

/// How a row's values are tagged.
const NULL: u8 = 0;
const INTEGER: u8 = 1;
const REAL: u8 = 2;
const TEXT: u8 = 3;
const BLOB: u8 = 4;

/// A frame's header: the payload's length and CRC-32, little-endian.
const HEADER: usize = 8;

/// The items of one write, encoded as they are added after room for the
/// header, which sealing fills in (the frame is written as it is built,
/// never copied).
pub struct Frame {
    bytes: Vec<u8>,
}

impl Default for Frame {
    fn default() -> Self {
        Self {
            bytes: vec![0; HEADER],
        }
    }
}

impl Frame {
    pub fn is_empty(&self) -> bool {
        self.bytes.len() == HEADER
    }

    /// An account's whole state, under its storage key.
    pub fn state(&mut self, key: &str, state: &ClientState) {
        self.bytes.push(STATE);
        self.text(key);
        for number in [
            state.requests.tat,
            state.tokens.tat,
            u64::from(state.day.period),
            state.day.used,
            u64::from(state.month.period),
            state.month.used,
            u64::from(state.cost_day.period),
            state.cost_day.used,
            u64::from(state.cost_month.period),
            state.cost_month.used,
        ] {
            self.bytes.extend_from_slice(&number.to_le_bytes());
        }
    }

    /// A row for `table`: `values` in the order of `columns` (a comma
    /// separated list of column names).
    pub fn row(
        &mut self,
        table: &str,
        columns: &str,
        values: &[&dyn ToSql],
    ) -> rusqlite::Result<()> {
        let count = u16::try_from(values.len()).map_err(|_| {
            rusqlite::Error::InvalidParameterCount(values.len(), usize::from(u16::MAX))
        })?;
        let start = self.bytes.len();
        self.bytes.push(ROW);
        self.text(table);
        self.text(columns);
        self.bytes.extend_from_slice(&count.to_le_bytes());
        for value in values {
            let value = match value.to_sql() {
                Ok(value) => value,
                Err(e) => {
                    self.bytes.truncate(start);
                    return Err(e);
                }
            };
            match value_ref(&value) {
                ValueRef::Null => self.bytes.push(NULL),
                ValueRef::Integer(n) => {
                    self.bytes.push(INTEGER);
                    self.bytes.extend_from_slice(&n.to_le_bytes());
                }
                ValueRef::Real(x) => {
                    self.bytes.push(REAL);
                    self.bytes.extend_from_slice(&x.to_le_bytes());
                }
                ValueRef::Text(bytes) => {
                    self.bytes.push(TEXT);
                    self.bytes(bytes);
                }
                ValueRef::Blob(bytes) => {
                    self.bytes.push(BLOB);
                    self.bytes(bytes);
                }
            }
        }
        Ok(())
    }

    fn text(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        // A length past u32 cannot come from Iris's rows; saturating keeps
        // the encoding total (the frame's CRC then fails it on reading).
        let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.bytes.extend_from_slice(&length.to_le_bytes());
        self.bytes.extend_from_slice(bytes);
    }

    /// The frame as written: the header filled in, then the payload.
    fn sealed(&mut self) -> &[u8] {
        let (header, payload) = self.bytes.split_at_mut(HEADER);
        let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        header[..4].copy_from_slice(&length.to_le_bytes());
        header[4..].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        &self.bytes
    }
}

fn value_ref<'a>(value: &'a rusqlite::types::ToSqlOutput<'a>) -> ValueRef<'a> {
    use rusqlite::types::ToSqlOutput;
    match value {
        ToSqlOutput::Borrowed(value) => *value,
        ToSqlOutput::Owned(value) => value.into(),
        // Iris's rows hold none of the other forms (zero blobs, arrays).
        _ => ValueRef::Null,
    }
}

/// One item read back.
#[derive(Debug, PartialEq)]
pub enum Item {
    State(String, ClientState),
    Row {
        table: String,
        columns: String,
        values: Vec<Value>,
    },
}

/// The items of every whole frame in `bytes`, and how many bytes those
/// frames took (less than `bytes.len()` when the file ends in a write cut
/// short).
pub fn read_frames(bytes: &[u8]) -> (Vec<Item>, usize) {
    let mut items = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + HEADER) {
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + length) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(frame) = Reader(payload).items() else {
            break;
        };
        items.extend(frame);
        at += HEADER + length;
    }
    (items, at)
}

/// Reads a frame's payload, item by item.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn items(mut self) -> Option<Vec<Item>> {
        let mut items = Vec::new();
        while let Some(tag) = self.byte() {
            items.push(match tag {
                STATE => self.state()?,
                ROW => self.row()?,
                _ => return None,
            });
        }
        Some(items)
    }

    fn state(&mut self) -> Option<Item> {
        let key = self.text()?;
        let mut n = [0u64; 10];
        for number in &mut n {
            *number = self.u64()?;
        }
        // A window's period (a day or month number) and what it used.
        let calendar = |at: usize| {
            Some(Calendar {
                period: u32::try_from(n[at]).ok()?,
                used: n[at + 1],
            })
        };
        Some(Item::State(
            key,
            ClientState {
                requests: Bucket { tat: n[0] },
                tokens: Bucket { tat: n[1] },
                day: calendar(2)?,
                month: calendar(4)?,
                cost_day: calendar(6)?,
                cost_month: calendar(8)?,
                in_flight: 0,
            },
        ))
    }

    fn row(&mut self) -> Option<Item> {
        let table = self.text()?;
        let columns = self.text()?;
        let count = u16::from_le_bytes(self.array()?);
        let mut values = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            values.push(match self.byte()? {
                NULL => Value::Null,
                INTEGER => Value::Integer(i64::from_le_bytes(self.array()?)),
                REAL => Value::Real(f64::from_le_bytes(self.array()?)),
                TEXT => Value::Text(self.text()?),
                BLOB => Value::Blob(self.bytes()?.to_vec()),
                _ => return None,
            });
        }
        Some(Item::Row {
            table,
            columns,
            values,
        })
    }

    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn bytes(&mut self) -> Option<&[u8]> {
        let length = u32::from_le_bytes(self.array()?) as usize;
        let bytes = self.0.get(..length)?;
        self.0 = &self.0[length..];
        Some(bytes)
    }

    fn text(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

/// The `INSERT` a row item replays as, once its names are checked to be
/// plain identifiers (the file is Iris's own, but a name is never spliced
/// into SQL unchecked).
pub fn insert_sql(table: &str, columns: &str, values: usize) -> Option<String> {
    let identifier = |name: &str| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let names: Vec<&str> = columns.split(',').map(str::trim).collect();
    if !identifier(table) || names.len() != values || !names.iter().all(|n| identifier(n)) {
        return None;
    }
    let places: Vec<String> = (1..=values).map(|i| format!("?{i}")).collect();
    Some(format!(
        "INSERT OR IGNORE INTO {table} ({}) VALUES ({})",
        names.join(", "),
        places.join(", ")
    ))
}

/// The log's files beside `store` (`<store>.wal.<N>`), by generation.
pub fn files(store: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let Some(name) = store.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.wal.");
    let dir = match store.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(generation) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        found.push((generation, entry.path()));
    }
    found.sort();
    Ok(found)
}

fn file_of(store: &Path, generation: u64) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(format!(".wal.{generation}"));
    PathBuf::from(name)
}

/// The file frames are appended to, and the files sealed but not yet
/// folded into the SQLite file.
pub struct Writer {
    store: PathBuf,
    /// The current file, opened on its first frame.
    file: Option<File>,
    generation: u64,
    /// Bytes in the current file.
    bytes: u64,
    /// Generations written and closed, waiting for a flush to absorb them.
    sealed: Vec<u64>,
    /// A write failed: frames stop, and every flush takes all there is.
    failed: bool,
}

impl Writer {
    /// A writer whose first file is generation `first`.
    pub fn new(store: &Path, first: u64) -> Self {
        Self {
            store: store.to_owned(),
            file: None,
            bytes: 0,
            generation: first,
            sealed: Vec::new(),
            failed: false,
        }
    }

    /// Whether frames are being written (no write has failed).
    pub fn on(&self) -> bool {
        !self.failed
    }

    /// Stops the log for the process's life (a frame could not be made).
    pub fn turn_off(&mut self) {
        self.failed = true;
    }

    /// Bytes written to the current file.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether files wait for a flush to absorb them.
    pub fn has_sealed(&self) -> bool {
        !self.sealed.is_empty()
    }

    /// Appends `frame`; once a write fails, the log is off for the
    /// process's life and this says why.
    pub fn append(&mut self, frame: &mut Frame) -> std::io::Result<()> {
        let result = self.try_append(frame);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn try_append(&mut self, frame: &mut Frame) -> std::io::Result<()> {
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(
                File::options()
                    .create(true)
                    .append(true)
                    .open(file_of(&self.store, self.generation))?,
            ),
        };
        let sealed = frame.sealed();
        file.write_all(sealed)?;
        self.bytes += sealed.len() as u64;
        Ok(())
    }

    /// Closes the current file if it holds frames: every frame written so
    /// far is then in a generation at most the one returned, which a flush
    /// that commits afterwards has absorbed.
    pub fn seal(&mut self) -> u64 {
        if self.file.take().is_some() {
            self.bytes = 0;
            self.sealed.push(self.generation);
            self.generation += 1;
        }
        self.generation - 1
    }

    /// Removes the sealed files through `generation` (a flush absorbed them).
    pub fn remove_through(&mut self, generation: u64) {
        let store = &self.store;
        self.sealed.retain(|&sealed| {
            if sealed > generation {
                return true;
            }
            if let Err(e) = std::fs::remove_file(file_of(store, sealed)) {
                tracing::warn!(
                    "write-ahead log: {}",
                    removal_error(&file_of(store, sealed), &e)
                );
            }
            false
        });
    }
}

fn removal_error(path: &Path, e: &std::io::Error) -> String {
    format!(
        "{} not removed (it is replayed at the next start, harmlessly): {e}",
        path.display()
    )
}

/// Removes a file replayed at startup.
pub fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!("write-ahead log: {}", removal_error(path, &e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(used: u64) -> ClientState {
        ClientState {
            requests: Bucket { tat: 11 },
            tokens: Bucket { tat: 22 },
            day: Calendar {
                period: 20_000,
                used,
            },
            month: Calendar {
                period: 24_300,
                used: used * 2,
            },
            cost_day: Calendar {
                period: 20_000,
                used: 7,
            },
            cost_month: Calendar {
                period: 24_300,
                used: 70,
            },
            in_flight: 0,
        }
    }

    #[test]
    fn frames_read_back_as_written_and_a_cut_tail_is_left_out() {
        let mut first = Frame::default();
        first.state("client:a", &state(5));
        let note: Option<&str> = None;
        first
            .row(
                "spend_log",
                "record_id, at, note, ratio, data",
                &[&"r1", &42_i64, &note, &0.5_f64, &vec![1_u8, 2]],
            )
            .expect("row");
        let mut second = Frame::default();
        second.state("team:t", &state(9));
        let mut bytes = first.sealed().to_vec();
        bytes.extend_from_slice(second.sealed());
        let whole = bytes.len();

        let (items, read) = read_frames(&bytes);
        assert_eq!(read, whole);
        assert_eq!(
            items,
            [
                Item::State("client:a".into(), state(5)),
                Item::Row {
                    table: "spend_log".into(),
                    columns: "record_id, at, note, ratio, data".into(),
                    values: vec![
                        Value::Text("r1".into()),
                        Value::Integer(42),
                        Value::Null,
                        Value::Real(0.5),
                        Value::Blob(vec![1, 2]),
                    ],
                },
                Item::State("team:t".into(), state(9)),
            ]
        );

        // The last write cut short, at every length: the first frame stays.
        let first_length = first.sealed().len();
        for cut in first_length..whole {
            let (items, read) = read_frames(&bytes[..cut]);
            assert_eq!((items.len(), read), (2, first_length), "cut at {cut}");
        }
        // A byte flipped in the second frame: its CRC leaves it out.
        let mut flipped = bytes.clone();
        flipped[whole - 3] ^= 0x40;
        assert_eq!(read_frames(&flipped).1, first_length);
    }

    #[test]
    fn only_plain_names_make_an_insert() {
        assert_eq!(
            insert_sql("spend_log", "record_id, at", 2).as_deref(),
            Some("INSERT OR IGNORE INTO spend_log (record_id, at) VALUES (?1, ?2)")
        );
        assert_eq!(insert_sql("spend_log", "a, b", 3), None, "count");
        assert_eq!(insert_sql("x; DROP TABLE y", "a", 1), None);
        assert_eq!(insert_sql("t", "a) VALUES (1); --", 1), None);
        assert_eq!(insert_sql("t", "", 1), None);
    }

    #[test]
    fn sealed_files_are_removed_once_absorbed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("iris.db");
        let mut writer = Writer::new(&store, 4);
        assert_eq!(writer.seal(), 3, "nothing written: nothing sealed");
        let mut frame = Frame::default();
        frame.state("k", &state(1));
        writer.append(&mut frame).expect("append");
        assert_eq!(writer.seal(), 4);
        writer.append(&mut frame).expect("append");
        assert_eq!(writer.seal(), 5);
        writer.append(&mut frame).expect("append");
        let generations: Vec<u64> = files(&store).expect("files").iter().map(|f| f.0).collect();
        assert_eq!(generations, [4, 5, 6]);
        writer.remove_through(4);
        let generations: Vec<u64> = files(&store).expect("files").iter().map(|f| f.0).collect();
        assert_eq!(generations, [5, 6], "the current file stays");
    }
}
