//! Is the database whole? Checked before anything opens it for writing.
//!
//! SQLite replays its write-ahead log (`majordome.db-wal`) up to the first
//! frame whose checksum fails, and silently drops everything after: one
//! damaged frame would cost every write acknowledged after it, and the next
//! checkpoint would make the loss permanent. So before the hub opens the
//! database, [`check`] reads the log itself and looks for committed
//! transactions *after* a bad frame; then SQLite's `PRAGMA quick_check`
//! looks at the pages.
//!
//! What this can and cannot see:
//! - **Seen:** a damaged frame (flipped bits, a zeroed or overwritten
//!   block) followed by frames of later commits: each frame's checksum is
//!   verified from its predecessor's stored checksum, so intact frames are
//!   recognised past the damage.
//! - **Seen:** damaged pages in the main file (`quick_check`).
//! - **Not seen:** a log cut at a frame boundary, or damage that reaches the
//!   end of the log: what is left is a valid log with fewer transactions,
//!   just as after a crash. Nothing in the files records how many commits
//!   there were.
//! - **Not seen:** a log cut inside its last frame: that is also what a
//!   crash in the middle of a commit leaves (a commit that was never
//!   acknowledged).
//!
//! The byte layout is SQLite's documented WAL format
//! (<https://www.sqlite.org/fileformat.html#the_write_ahead_log>).

use std::io::Read;
use std::path::{Path, PathBuf};

/// Length of the log's header.
const HEADER: usize = 32;
/// Length of each frame's header (the page follows it).
const FRAME_HEADER: usize = 24;

/// What [`read_wal`] found in a write-ahead log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WalReport {
    /// Frames SQLite will replay: valid ones, up to the last commit before
    /// the first bad frame.
    pub replayed_commits: usize,
    /// Where the first frame that does not check out starts, if one does
    /// not and something follows it.
    pub damaged_at: Option<u64>,
    /// Commits whose frames check out but come after the damage: SQLite
    /// would drop them.
    pub commits_after_damage: usize,
}

/// Why a database is not whole.
#[derive(Debug, thiserror::Error)]
pub enum Damage {
    #[error(
        "its write-ahead log {wal} is damaged at byte {offset}: {lost} committed transaction(s) after that point \
         would be lost if it were opened"
    )]
    Wal { wal: PathBuf, offset: u64, lost: usize },
    #[error("SQLite's quick_check found: {0}")]
    Pages(String),
    #[error("it cannot be read: {0}")]
    Unreadable(String),
}

/// Reads the write-ahead log beside `database` (if there is one) and
/// checks every frame; see the module documentation.
pub fn read_wal(database: &Path) -> std::io::Result<WalReport> {
    match std::fs::File::open(wal_path(database)) {
        Ok(file) => inspect(std::io::BufReader::new(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(WalReport::default()),
        Err(e) => Err(e),
    }
}

/// The log of `database`: its path with `-wal` appended.
pub fn wal_path(database: &Path) -> PathBuf {
    crate::with_suffix(database, "-wal")
}

fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// SQLite's WAL checksum of `data` (a multiple of 8 bytes), continuing
/// from `seed`; words are big-endian when `big_endian`, else little-endian.
fn checksum(seed: (u32, u32), data: &[u8], big_endian: bool) -> (u32, u32) {
    let (mut s0, mut s1) = seed;
    for pair in data.chunks_exact(8) {
        let read = |b: &[u8]| {
            let b: [u8; 4] = b.try_into().expect("4 bytes");
            if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        s0 = s0.wrapping_add(read(&pair[..4])).wrapping_add(s1);
        s1 = s1.wrapping_add(read(&pair[4..])).wrapping_add(s0);
    }
    (s0, s1)
}

/// Reads a log frame by frame: memory for one page, whatever the log's
/// size (a log that a long reader kept from checkpointing may be large).
fn inspect(mut log: impl Read) -> std::io::Result<WalReport> {
    let mut report = WalReport::default();
    let mut header = [0u8; HEADER];
    if !read_whole(&mut log, &mut header)? {
        return Ok(report);
    }
    let magic = word(&header, 0);
    if magic & !1 != 0x377f_0682 {
        // Not a log SQLite would replay either.
        return Ok(report);
    }
    let big_endian = magic & 1 == 1;
    let page_size = word(&header, 8) as usize;
    let salts = (word(&header, 16), word(&header, 20));
    let header_sum = (word(&header, 24), word(&header, 28));
    if !(512..=65536).contains(&page_size)
        || !page_size.is_power_of_two()
        || checksum((0, 0), &header[..24], big_endian) != header_sum
    {
        return Ok(report);
    }
    let stored = |f: &[u8]| (word(f, 16), word(f, 20));
    // Whether a frame checks out when its chain starts from `seed`.
    let valid = |f: &[u8], seed: (u32, u32)| {
        (word(f, 8), word(f, 12)) == salts && {
            let sum = checksum(seed, &f[..8], big_endian);
            checksum(sum, &f[FRAME_HEADER..], big_endian) == stored(f)
        }
    };
    let is_commit = |f: &[u8]| word(f, 4) != 0;
    let mut frame = vec![0u8; FRAME_HEADER + page_size];
    // The chain of valid frames; once a frame fails, each later frame is
    // checked against the checksum its predecessor stored instead: an
    // intact frame checks out whatever came before.
    let mut seed = header_sum;
    let mut first_bad = None;
    let mut previous = header_sum;
    let mut index = 0u64;
    while read_whole(&mut log, &mut frame)? {
        match first_bad {
            None if valid(&frame, seed) => {
                seed = stored(&frame);
                report.replayed_commits += usize::from(is_commit(&frame));
            }
            None => first_bad = Some(index),
            Some(_) => report.commits_after_damage += usize::from(valid(&frame, previous) && is_commit(&frame)),
        }
        previous = stored(&frame);
        index += 1;
    }
    if let Some(bad) = first_bad.filter(|_| report.commits_after_damage > 0) {
        report.damaged_at = Some(HEADER as u64 + bad * frame.len() as u64);
    }
    Ok(report)
}

/// Fills `buffer` from `log`; `false` at the end (a partial last frame
/// counts as the end, as for SQLite).
fn read_whole(log: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<bool> {
    match log.read_exact(buffer) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Checks the database at `database` before it is opened for writing: its
/// log first, then its pages. A missing database is whole (it will be
/// created). Nothing is written.
pub fn check(database: &Path) -> Result<(), Damage> {
    if !database.exists() {
        return Ok(());
    }
    let report = read_wal(database).map_err(|e| Damage::Unreadable(e.to_string()))?;
    if let Some(offset) = report.damaged_at {
        return Err(Damage::Wal {
            wal: wal_path(database),
            offset,
            lost: report.commits_after_damage,
        });
    }
    quick_check(database)
}

/// SQLite's `PRAGMA quick_check` on `database`, opened read-only.
pub fn quick_check(database: &Path) -> Result<(), Damage> {
    use rusqlite::OpenFlags;
    let unreadable = |e: rusqlite::Error| Damage::Unreadable(e.to_string());
    let connection = rusqlite::Connection::open_with_flags(
        database,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(unreadable)?;
    let mut statement = connection.prepare("PRAGMA quick_check").map_err(unreadable)?;
    let findings: Vec<String> = statement
        .query_map([], |row| row.get::<_, String>(0))
        .map_err(unreadable)?
        .collect::<Result<_, _>>()
        .map_err(unreadable)?;
    if findings.len() == 1 && findings[0] == "ok" {
        Ok(())
    } else {
        Err(Damage::Pages(findings.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// A database in WAL mode with `commits` committed inserts, all still
    /// in its log: the files are copied (as a crash would leave them)
    /// while the connection is open, since closing checkpoints the log.
    fn crashed_database(commits: usize) -> (tempfile::TempDir, PathBuf) {
        let live = tempfile::tempdir().unwrap();
        let path = live.path().join("live.db");
        let connection = Connection::open(&path).unwrap();
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
                 CREATE TABLE t (n INTEGER, filler BLOB);",
            )
            .unwrap();
        for n in 0..commits {
            connection
                .execute("INSERT INTO t VALUES (?1, zeroblob(100))", [n as i64])
                .unwrap();
        }
        let copy = tempfile::tempdir().unwrap();
        let database = copy.path().join("majordome.db");
        std::fs::copy(&path, &database).unwrap();
        std::fs::copy(wal_path(&path), wal_path(&database)).unwrap();
        drop(connection);
        (copy, database)
    }

    fn rows(database: &Path) -> i64 {
        let connection = Connection::open(database).unwrap();
        connection
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    fn page_size(database: &Path) -> usize {
        word(&std::fs::read(wal_path(database)).unwrap(), 8) as usize
    }

    #[test]
    fn an_intact_log_checks_out() {
        let (_dir, database) = crashed_database(20);
        let report = read_wal(&database).unwrap();
        // The table's creation is one more commit.
        assert_eq!(report.replayed_commits, 21);
        assert_eq!(report.damaged_at, None);
        check(&database).unwrap();
        assert_eq!(rows(&database), 20);
    }

    /// What SQLite does with it, pinned: it stops at the damage, silently.
    #[test]
    fn a_damaged_frame_with_commits_after_it_is_caught() {
        let (_dir, database) = crashed_database(20);
        let frame = FRAME_HEADER + page_size(&database);
        let wal = wal_path(&database);
        let mut bytes = std::fs::read(&wal).unwrap();
        // Garble the page of the 8th frame.
        let at = HEADER + 7 * frame + FRAME_HEADER + 100;
        for byte in &mut bytes[at..at + 16] {
            *byte ^= 0x5a;
        }
        std::fs::write(&wal, &bytes).unwrap();
        let report = read_wal(&database).unwrap();
        assert_eq!(report.damaged_at, Some((HEADER + 7 * frame) as u64));
        // Each insert is one frame and one commit: the damaged one is lost
        // whatever happens; the ones after it are what the check saves.
        assert_eq!(report.replayed_commits + 1 + report.commits_after_damage, 21);
        assert!(report.commits_after_damage >= 10, "{report:?}");
        let error = check(&database).unwrap_err().to_string();
        assert!(
            error.contains("is damaged at byte")
                && error.contains(&format!("{} committed transaction(s)", report.commits_after_damage)),
            "{error}"
        );
        // SQLite itself opens it silently with what came before the damage
        // (the table's creation was the first commit).
        assert_eq!(rows(&database), report.replayed_commits as i64 - 1);
    }

    /// The limit, pinned: a log cut at a frame boundary is a valid, shorter
    /// log; it looks exactly like a crash.
    #[test]
    fn a_log_cut_at_a_frame_boundary_cannot_be_told_from_a_crash() {
        let (_dir, database) = crashed_database(20);
        let frame = FRAME_HEADER + page_size(&database);
        let wal = wal_path(&database);
        let bytes = std::fs::read(&wal).unwrap();
        std::fs::write(&wal, &bytes[..HEADER + 10 * frame + frame / 2]).unwrap();
        let report = read_wal(&database).unwrap();
        assert_eq!(report.damaged_at, None);
        assert!((1..21).contains(&report.replayed_commits), "{report:?}");
        check(&database).unwrap();
        assert_eq!(rows(&database), report.replayed_commits as i64 - 1);
    }

    #[test]
    fn damaged_pages_in_the_main_file_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("majordome.db");
        {
            let connection = Connection::open(&database).unwrap();
            connection
                .execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY, filler BLOB); CREATE INDEX i ON t(filler);")
                .unwrap();
            for n in 0..200 {
                connection
                    .execute("INSERT INTO t VALUES (?1, randomblob(200))", [n])
                    .unwrap();
            }
        }
        let mut bytes = std::fs::read(&database).unwrap();
        // Keep page 1 (the schema); garble the middle of the others.
        let page = u16::from_be_bytes([bytes[16], bytes[17]]) as usize;
        for start in (page..bytes.len()).step_by(page) {
            for byte in &mut bytes[start + 8..start + 64] {
                *byte = 0xff;
            }
        }
        std::fs::write(&database, &bytes).unwrap();
        let error = check(&database).unwrap_err();
        assert!(matches!(error, Damage::Pages(_) | Damage::Unreadable(_)), "{error}");
    }

    #[test]
    fn a_missing_database_or_log_is_fine_and_junk_is_no_log() {
        let dir = tempfile::tempdir().unwrap();
        check(&dir.path().join("none.db")).unwrap();
        assert_eq!(inspect(&b"short"[..]).unwrap(), WalReport::default());
        assert_eq!(inspect(&[7u8; 5000][..]).unwrap(), WalReport::default());
    }
}
