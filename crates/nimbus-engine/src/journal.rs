//! The invocation journal: every record is appended to a local file before its invocation
//! answers, and read back from there into the metadata store (the recorder does).
//!
//! Layout: `<data_dir>/records/<n>.journal`, numbered segments appended in order; a segment
//! is closed once past [`SEGMENT_BYTES`] and a new one begins (so does every start of the
//! server). A frame is the payload's length (u32, little endian), its CRC-32 (u32, little
//! endian) and the payload: the record as JSON.
//!
//! Durability: an append is one `write(2)` to the segment before the invocation answers,
//! so a record survives the server being killed (`kill -9`, a crash) from then on; the
//! kernel writes it to disk later. Segments are `fdatasync`ed every second while they
//! change (and when the server stops), so a crash of the machine itself (power loss,
//! kernel panic) can lose the records of the last second. A segment is deleted once every
//! record in it is in the store.
//!
//! Reading stops at the first frame that does not check out: in the segment being written,
//! that is where the writer is (or was, when the server died mid-append); in an older one,
//! the rest of that segment is unreadable and is reported.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nimbus_core::invocation::InvocationError;
use nimbus_core::{Invocation, InvocationStatus, StartType, Trigger};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A segment is closed, and a new one begun, once it holds this many bytes.
pub(crate) const SEGMENT_BYTES: u64 = 1 << 20;
/// Bytes before a frame's payload: its length and its checksum.
const HEADER: usize = 8;
/// Largest payload a frame may declare; past it the frame is garbage (a record is at most
/// two 64 KiB payloads, 4 KiB of logs and an error message with its traceback).
const MAX_PAYLOAD: usize = 64 << 20;
/// Suffix of segment files.
const SUFFIX: &str = ".journal";

/// A place in the journal: a segment and a byte offset in it, ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position {
    /// Segment number.
    pub segment: u64,
    /// Bytes into the segment.
    pub offset: u64,
}

/// The segment being appended to.
struct Active {
    number: u64,
    file: File,
    len: u64,
    /// Appended to since the last sync.
    dirty: bool,
    /// Closed segments (and the directory, once a segment was created) still to sync.
    unsynced: Vec<File>,
    /// Its file was deleted (everything in it was stored): the next append begins a new
    /// segment.
    deleted: bool,
}

/// The journal's appending side. Shared by every invocation; one append at a time.
pub(crate) struct Journal {
    dir: PathBuf,
    active: Mutex<Active>,
}

impl Journal {
    /// Opens the journal in `dir` (created if missing, readable by its owner only: records
    /// hold events and results): earlier segments are kept for reading, and appends go to
    /// a new segment after them.
    pub(crate) fn open(dir: &Path) -> io::Result<Journal> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let next = segments(dir)?.last().map_or(1, |n| n + 1);
        let file = create_segment(dir, next)?;
        Ok(Journal {
            dir: dir.to_owned(),
            active: Mutex::new(Active {
                number: next,
                file,
                len: 0,
                dirty: false,
                unsynced: vec![File::open(dir)?],
                deleted: false,
            }),
        })
    }

    /// The directory of the segments.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one record (a single write) and returns where the journal ends after it.
    /// A failed write leaves the journal as it was.
    pub(crate) fn append(&self, record: &Invocation) -> io::Result<Position> {
        let payload = serde_json::to_vec(&Entry::from(record))?;
        let mut frame = Vec::with_capacity(HEADER + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);

        let mut active = self.active.lock().expect("journal lock");
        if active.deleted {
            self.rotate(&mut active)?;
        }
        if let Err(e) = active.file.write_all(&frame) {
            // Cut off whatever part of the frame was written, so the next one follows a
            // whole frame; if even that fails, go on in a new segment.
            let len = active.len;
            if active.file.set_len(len).is_err() || active.file.seek(SeekFrom::End(0)).is_err() {
                let _ = self.rotate(&mut active);
            }
            return Err(e);
        }
        active.len += frame.len() as u64;
        active.dirty = true;
        if active.len >= SEGMENT_BYTES {
            // The record is in; a failure to begin the next segment shows at the next append.
            let _ = self.rotate(&mut active);
        }
        Ok(Position {
            segment: active.number,
            offset: active.len,
        })
    }

    /// Where the journal ends now.
    pub(crate) fn end(&self) -> Position {
        let active = self.active.lock().expect("journal lock");
        Position {
            segment: active.number,
            offset: active.len,
        }
    }

    /// Writes what was appended since the last sync to disk (`fdatasync`; off the append
    /// path, which only holds the lock to pick the files).
    pub(crate) fn sync(&self) -> io::Result<()> {
        let files = {
            let mut active = self.active.lock().expect("journal lock");
            let mut files = std::mem::take(&mut active.unsynced);
            if std::mem::take(&mut active.dirty) {
                files.push(active.file.try_clone()?);
            }
            files
        };
        files.iter().try_for_each(File::sync_data)
    }

    /// Closes the active segment and begins the next one (both synced by the next sync).
    fn rotate(&self, active: &mut Active) -> io::Result<()> {
        let next = active.number + 1;
        let dir = File::open(&self.dir)?;
        let file = create_segment(&self.dir, next)?;
        let closed = std::mem::replace(&mut active.file, file);
        if std::mem::take(&mut active.dirty) && !active.deleted {
            active.unsynced.push(closed);
        }
        active.unsynced.push(dir);
        active.number = next;
        active.len = 0;
        active.deleted = false;
        Ok(())
    }

    /// Deletes every segment whose records are all stored (all before `stored`, where a
    /// cursor reading the journal stands), the one being appended to included when
    /// everything in it is stored: under the append lock, so no record is appended to a
    /// segment deleted here (the next append begins a new one). True if the journal held
    /// nothing else.
    pub(crate) fn delete_stored(&self, stored: Position) -> io::Result<bool> {
        let mut active = self.active.lock().expect("journal lock");
        let all = stored
            >= Position {
                segment: active.number,
                offset: active.len,
            };
        for number in segments(&self.dir)? {
            let is_active = number == active.number;
            if number < stored.segment || (is_active && all) {
                delete_segment(&self.dir, number);
            }
        }
        if all {
            active.deleted = true;
            active.dirty = false;
        }
        Ok(all)
    }
}

fn create_segment(dir: &Path, number: u64) -> io::Result<File> {
    OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(segment_path(dir, number))
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}{SUFFIX}"))
}

/// The numbers of the segments in `dir`, ascending.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse().ok())
        {
            numbers.push(number);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Reads the journal from its oldest segment on, never past what has been appended.
pub(crate) struct Cursor {
    dir: PathBuf,
    /// Where the next frame starts.
    at: Position,
    /// The open segment `at.segment`, if it is open.
    file: Option<File>,
}

/// What one [`Cursor::read`] found.
pub(crate) struct Chunk {
    /// Records, in the order they were appended.
    pub records: Vec<Invocation>,
    /// Segments read to their end (closed ones only): deletable once their records are
    /// stored.
    pub finished: Vec<u64>,
}

impl Cursor {
    /// A cursor at the start of the oldest segment in `dir`.
    pub(crate) fn new(dir: &Path) -> io::Result<Cursor> {
        let first = segments(dir)?.first().copied().unwrap_or(1);
        Ok(Cursor {
            dir: dir.to_owned(),
            at: Position {
                segment: first,
                offset: 0,
            },
            file: None,
        })
    }

    /// Where the next read starts.
    pub(crate) fn position(&self) -> Position {
        self.at
    }

    /// Reads up to `max` records appended before `end` (see [`Journal::end`]).
    pub(crate) fn read(&mut self, end: Position, max: usize) -> io::Result<Chunk> {
        let mut read = Chunk {
            records: Vec::new(),
            finished: Vec::new(),
        };
        while read.records.len() < max && self.at < end {
            let closed = self.at.segment < end.segment;
            let limit = if closed { u64::MAX } else { end.offset };
            match self.next_frame(limit)? {
                Frame::Record(record) => read.records.push(*record),
                Frame::End if closed => {
                    read.finished.push(self.at.segment);
                    self.next_segment();
                }
                Frame::End => break,
                Frame::Bad(why) => {
                    tracing::error!(
                        segment = %segment_path(&self.dir, self.at.segment).display(),
                        offset = self.at.offset,
                        "invocation records lost: a journal segment is unreadable from here ({why})"
                    );
                    if closed {
                        read.finished.push(self.at.segment);
                        self.next_segment();
                    } else {
                        // The segment being appended to: go on after what it holds now.
                        self.at.offset = end.offset;
                        self.file = None;
                    }
                }
            }
        }
        Ok(read)
    }

    fn next_segment(&mut self) {
        self.at = Position {
            segment: self.at.segment + 1,
            offset: 0,
        };
        self.file = None;
    }

    /// The frame at the cursor, if it lies within `limit` bytes of its segment.
    fn next_frame(&mut self, limit: u64) -> io::Result<Frame> {
        if self.file.is_none() {
            match File::open(segment_path(&self.dir, self.at.segment)) {
                Ok(mut file) => {
                    file.seek(SeekFrom::Start(self.at.offset))?;
                    self.file = Some(file);
                }
                // Deleted, or never created (a rotation that failed): nothing in it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Frame::End),
                Err(e) => return Err(e),
            }
        }
        let file = self.file.as_mut().expect("opened above");
        if self.at.offset + HEADER as u64 > limit {
            return Ok(Frame::End);
        }
        let mut header = [0u8; HEADER];
        match read_full(file, &mut header)? {
            0 => return Ok(Frame::End),
            n if n < HEADER => return self.torn(),
            _ => {}
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD {
            return Ok(Frame::Bad(format!("a frame declares {len} bytes")));
        }
        if self.at.offset + (HEADER + len) as u64 > limit {
            return self.torn();
        }
        let mut payload = vec![0u8; len];
        if read_full(file, &mut payload)? < len {
            return self.torn();
        }
        if crc32fast::hash(&payload) != crc {
            return Ok(Frame::Bad("a frame's checksum does not match".into()));
        }
        let entry: Entry = match serde_json::from_slice(&payload) {
            Ok(entry) => entry,
            Err(e) => return Ok(Frame::Bad(format!("a frame does not decode: {e}"))),
        };
        self.at.offset += (HEADER + len) as u64;
        Ok(Frame::Record(Box::new(entry.into_invocation())))
    }

    /// A frame cut short: the end of what was written (the server died mid-append).
    fn torn(&mut self) -> io::Result<Frame> {
        // Read it again from its start next time.
        self.file = None;
        Ok(Frame::End)
    }
}

/// Deletes segment `number` (its records are all stored).
pub(crate) fn delete_segment(dir: &Path, number: u64) {
    if let Err(e) = std::fs::remove_file(segment_path(dir, number)) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!("deleting journal segment {number}: {e}");
        }
    }
}

enum Frame {
    Record(Box<Invocation>),
    /// Nothing more to read here (for now).
    End,
    /// Not a frame: why.
    Bad(String),
}

/// Reads until `buf` is full or the file ends; how many bytes were read.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A record as the journal keeps it.
#[derive(Serialize, Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    request_id: Cow<'a, str>,
    #[serde(borrow)]
    function_id: Cow<'a, str>,
    #[serde(borrow)]
    function_name: Cow<'a, str>,
    version: u32,
    #[serde(borrow)]
    alias_used: Option<Cow<'a, str>>,
    #[serde(borrow)]
    session_key: Option<Cow<'a, str>>,
    trigger: Trigger,
    status: InvocationStatus,
    #[serde(borrow)]
    input: Option<Cow<'a, str>>,
    #[serde(borrow)]
    output: Option<Cow<'a, str>>,
    error: Option<Cow<'a, InvocationError>>,
    start_type: Option<StartType>,
    #[serde(borrow)]
    instance_id: Option<Cow<'a, str>>,
    #[serde(with = "time::serde::timestamp::nanoseconds")]
    started_at: OffsetDateTime,
    #[serde(with = "time::serde::timestamp::nanoseconds::option")]
    completed_at: Option<OffsetDateTime>,
    duration_ms: Option<f64>,
    memory_used_mb: Option<u32>,
    #[serde(borrow)]
    logs: Cow<'a, str>,
}

impl<'a> From<&'a Invocation> for Entry<'a> {
    fn from(r: &'a Invocation) -> Self {
        Entry {
            request_id: Cow::Borrowed(&r.request_id),
            function_id: Cow::Borrowed(&r.function_id),
            function_name: Cow::Borrowed(&r.function_name),
            version: r.version,
            alias_used: r.alias_used.as_deref().map(Cow::Borrowed),
            session_key: r.session_key.as_deref().map(Cow::Borrowed),
            trigger: r.trigger,
            status: r.status,
            input: r.input.as_deref().map(Cow::Borrowed),
            output: r.output.as_deref().map(Cow::Borrowed),
            error: r.error.as_ref().map(Cow::Borrowed),
            start_type: r.start_type,
            instance_id: r.instance_id.as_deref().map(Cow::Borrowed),
            started_at: r.started_at,
            completed_at: r.completed_at,
            duration_ms: r.duration_ms,
            memory_used_mb: r.memory_used_mb,
            logs: Cow::Borrowed(&r.logs),
        }
    }
}

impl Entry<'_> {
    fn into_invocation(self) -> Invocation {
        let owned = |c: Cow<'_, str>| c.into_owned();
        Invocation {
            request_id: owned(self.request_id),
            function_id: owned(self.function_id),
            function_name: owned(self.function_name),
            version: self.version,
            alias_used: self.alias_used.map(owned),
            session_key: self.session_key.map(owned),
            trigger: self.trigger,
            status: self.status,
            input: self.input.map(owned),
            output: self.output.map(owned),
            error: self.error.map(Cow::into_owned),
            start_type: self.start_type,
            instance_id: self.instance_id.map(owned),
            started_at: self.started_at,
            completed_at: self.completed_at,
            duration_ms: self.duration_ms,
            memory_used_mb: self.memory_used_mb,
            logs: owned(self.logs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_core::{ids, now};

    fn record(n: usize) -> Invocation {
        Invocation {
            request_id: ids::request_id(),
            function_id: "fn_1".into(),
            function_name: "f".into(),
            version: 1,
            alias_used: Some("latest".into()),
            session_key: None,
            trigger: Trigger::Http,
            status: InvocationStatus::Success,
            input: Some(format!("{{\"n\":{n}}}")),
            output: Some("\"ok \\\"quoted\\\"\"".into()),
            error: None,
            start_type: Some(StartType::Warm),
            instance_id: Some("inst_1".into()),
            started_at: now(),
            completed_at: Some(now()),
            duration_ms: Some(0.25),
            memory_used_mb: Some(12),
            logs: "printed\n".into(),
        }
    }

    fn read_all(dir: &Path, end: Position) -> Vec<Invocation> {
        let mut cursor = Cursor::new(dir).unwrap();
        cursor.read(end, usize::MAX).unwrap().records
    }

    #[test]
    fn records_come_back_as_appended_across_segments_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        // Big enough records to cross into new segments.
        let mut written = Vec::new();
        for n in 0..40 {
            let mut r = record(n);
            r.logs = "x".repeat(60 * 1024);
            journal.append(&r).unwrap();
            written.push(r);
        }
        assert!(journal.end().segment > 2, "the journal rotated");
        drop(journal);
        // A restart appends to a new segment after the old ones.
        let journal = Journal::open(dir.path()).unwrap();
        let last = record(99);
        journal.append(&last).unwrap();
        written.push(last);
        assert_eq!(read_all(dir.path(), journal.end()), written);
    }

    #[test]
    fn a_torn_tail_is_where_reading_stops_and_a_bad_frame_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let first = record(1);
        journal.append(&first).unwrap();
        let whole = journal.append(&record(2)).unwrap();
        drop(journal);
        // The server died in the middle of the second append.
        let path = segment_path(dir.path(), whole.segment);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(whole.offset - 5).unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        assert_eq!(read_all(dir.path(), journal.end()), vec![first.clone()]);

        // A flipped bit in a closed segment: its frame and the rest of the segment are
        // not read (the error is logged); later segments are.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 3] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let after = record(3);
        journal.append(&after).unwrap();
        assert_eq!(read_all(dir.path(), journal.end()), vec![after]);
    }

    #[test]
    fn a_cursor_reads_only_what_was_appended_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let mut cursor = Cursor::new(dir.path()).unwrap();
        assert!(cursor.read(journal.end(), 10).unwrap().records.is_empty());
        let (a, b, c) = (record(1), record(2), record(3));
        journal.append(&a).unwrap();
        journal.append(&b).unwrap();
        let end = journal.end();
        journal.append(&c).unwrap();
        assert_eq!(cursor.read(end, 1).unwrap().records, vec![a]);
        assert_eq!(cursor.read(end, 10).unwrap().records, vec![b]);
        assert_eq!(cursor.position(), end);
        assert_eq!(cursor.read(journal.end(), 10).unwrap().records, vec![c]);
    }
}
