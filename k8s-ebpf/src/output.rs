//! The alert writer: records leave the engine through a bounded queue and are written one
//! JSON object per line to stdout or to a size-rotated file (`alerts.json`,
//! `alerts.json.1`, …). Under pressure plain events are dropped before alerts, every drop
//! is counted, and a line that cannot be written goes to stderr instead: the writer
//! never stops for a full disk.
//!
//! The alert file is something a local user may try to subvert: every line in it is whole
//! or absent (a write cut short by a full disk is cut back out), it is created with mode
//! 0600 unless `--output-mode` says otherwise, and it is never opened through a symbolic
//! link, at start or when reopened after a rotation or a failure.
//!
//! `--format ocsf` translates each record on its way out ([`ocsf`]); ECS is the default.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    alert::{AlertEvent, RecordKind},
    metrics::Metrics,
};

pub mod ocsf;

pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;
/// How long an alert may wait for room in a full queue before it is dropped.
pub const DEFAULT_ALERT_WAIT: Duration = Duration::from_millis(100);
pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;
pub const DEFAULT_KEEP: usize = 5;
/// Alert files are readable by their owner only: they map who reaches the control plane.
pub const DEFAULT_FILE_MODE: u32 = 0o600;

/// Size-based rotation of the alert file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub path: PathBuf,
    /// Rotate before a line would take the file past this size.
    pub max_bytes: u64,
    /// Rotated files kept (`path.1` … `path.keep`); 0 truncates instead.
    pub keep: usize,
    /// Permission bits of the alert file (`--output-mode`), applied whenever it is opened.
    pub mode: u32,
}

impl Rotation {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
            mode: DEFAULT_FILE_MODE,
        }
    }
}

/// The schema of the lines written (`--format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Elastic Common Schema, as the pipeline builds the record.
    #[default]
    Ecs,
    /// Open Cybersecurity Schema Framework, translated from the ECS record.
    Ocsf,
}

/// Where records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(Rotation),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputSettings {
    pub destination: Destination,
    pub format: Format,
    pub queue_capacity: usize,
    pub alert_wait: Duration,
}

impl OutputSettings {
    pub fn new(destination: Destination) -> Self {
        Self {
            destination,
            format: Format::Ecs,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            alert_wait: DEFAULT_ALERT_WAIT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot open the alert file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "refusing the alert file {path}: it is a symbolic link (alert files are never opened \
         through one; point --output at the file itself, or use `-` for stdout)"
    )]
    Symlink { path: PathBuf },
    #[error("refusing the alert file {path}: it is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("the alert writer has stopped")]
    Closed,
    #[error("the alert writer failed: {0}")]
    Writer(String),
}

impl OutputError {
    /// A problem with the command line the user must fix (exit status 64).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Symlink { .. } | Self::NotAFile { .. })
    }
}

/// Counters kept by the queue and the writer (mirrored into [`Metrics`] when given).
#[derive(Debug, Default)]
pub struct OutputStats {
    pub written: AtomicU64,
    pub dropped_alerts: AtomicU64,
    pub dropped_events: AtomicU64,
    pub write_errors: AtomicU64,
}

/// A plain copy of [`OutputStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutputCounts {
    pub written: u64,
    pub dropped_alerts: u64,
    pub dropped_events: u64,
    pub write_errors: u64,
}

impl OutputStats {
    pub fn snapshot(&self) -> OutputCounts {
        OutputCounts {
            written: self.written.load(Ordering::Relaxed),
            dropped_alerts: self.dropped_alerts.load(Ordering::Relaxed),
            dropped_events: self.dropped_events.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }
}

enum Message {
    Record(Box<AlertEvent>),
    Flush(oneshot::Sender<()>),
}

/// The engine's end of the queue. Cheap to clone.
#[derive(Clone)]
pub struct AlertSender {
    tx: mpsc::Sender<Message>,
    capacity: usize,
    alert_wait: Duration,
    stats: Arc<OutputStats>,
    metrics: Option<Arc<Metrics>>,
}

impl AlertSender {
    fn dropped(&self, kind: RecordKind) {
        let counter = match kind {
            RecordKind::Alert => &self.stats.dropped_alerts,
            RecordKind::Event => &self.stats.dropped_events,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.output_dropped.with_label_values(&[kind.as_str()]).inc();
        }
    }

    /// Plain events only take the lower half of the queue, leaving the rest to alerts.
    fn event_has_room(&self) -> bool {
        let used = self.capacity.saturating_sub(self.tx.capacity());
        used * 2 < self.capacity
    }

    /// Queues a record. Events are dropped at once when the queue is half full; alerts
    /// wait up to the configured time for room, then are dropped. Returns whether the
    /// record was queued.
    pub async fn send(&self, record: AlertEvent) -> bool {
        let kind = record.kind();
        if kind == RecordKind::Event {
            return self.try_send(record);
        }
        match self.tx.try_send(Message::Record(Box::new(record))) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(msg)) => {
                match tokio::time::timeout(self.alert_wait, self.tx.send(msg)).await {
                    Ok(Ok(())) => true,
                    _ => {
                        self.dropped(kind);
                        false
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.dropped(kind);
                false
            }
        }
    }

    /// Queues a record without waiting (for synchronous callers): dropped and counted
    /// when there is no room.
    pub fn try_send(&self, record: AlertEvent) -> bool {
        let kind = record.kind();
        if kind == RecordKind::Event && !self.event_has_room() {
            self.dropped(kind);
            return false;
        }
        if self.tx.try_send(Message::Record(Box::new(record))).is_err() {
            self.dropped(kind);
            return false;
        }
        true
    }

    /// Waits until every record queued before this call is written and flushed.
    pub async fn flush(&self) -> Result<(), OutputError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Message::Flush(ack))
            .await
            .map_err(|_| OutputError::Closed)?;
        done.await.map_err(|_| OutputError::Closed)
    }

    pub fn stats(&self) -> &Arc<OutputStats> {
        &self.stats
    }
}

/// The writer task. Drop every [`AlertSender`], then [`OutputHandle::finish`] to drain,
/// flush and stop it.
pub struct OutputHandle {
    task: JoinHandle<()>,
    stats: Arc<OutputStats>,
}

impl OutputHandle {
    pub async fn finish(self) -> Result<OutputCounts, OutputError> {
        self.task
            .await
            .map_err(|e| OutputError::Writer(e.to_string()))?;
        Ok(self.stats.snapshot())
    }
}

/// Opens the destination and starts the writer on tokio's blocking pool.
pub fn spawn(
    settings: OutputSettings,
    metrics: Option<Arc<Metrics>>,
) -> Result<(AlertSender, OutputHandle), OutputError> {
    let sink: Box<dyn LineSink> = match settings.destination {
        Destination::Stdout => Box::new(StdoutSink),
        Destination::File(rotation) => Box::new(RotatingFile::open(rotation)?),
    };
    let capacity = settings.queue_capacity.max(2);
    let (tx, rx) = mpsc::channel(capacity);
    let stats = Arc::new(OutputStats::default());
    let writer = Writer {
        sink,
        format: settings.format,
        stats: Arc::clone(&stats),
        metrics: metrics.clone(),
    };
    let task = tokio::task::spawn_blocking(move || writer.run(rx));
    Ok((
        AlertSender {
            tx,
            capacity,
            alert_wait: settings.alert_wait,
            stats: Arc::clone(&stats),
            metrics,
        },
        OutputHandle { task, stats },
    ))
}

/// Somewhere lines go.
trait LineSink: Send {
    /// Writes one line (`line` has no newline).
    fn write_line(&mut self, line: &[u8]) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

struct StdoutSink;

impl LineSink for StdoutSink {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let mut out = io::stdout().lock();
        out.write_all(line)?;
        out.write_all(b"\n")
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

/// An append-only file rotated by size. Each line is one `write` so a failure is
/// attributable to one record; after a failure the file is reopened on the next line.
struct RotatingFile {
    rotation: Rotation,
    file: Option<File>,
    /// Where the file's last whole line ends.
    size: u64,
}

/// Opens (creating with `mode`) the alert file for appending, never through a symbolic
/// link at `path` (ELOOP). Anything but a regular file or a character device (`/dev/null`,
/// `/dev/full`) is refused; `O_NONBLOCK` keeps a FIFO planted at the path from blocking the
/// open.
fn open_alert_file(path: &Path, mode: u32) -> io::Result<File> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    // Read access too: a partial last line is found by reading the file's end.
    let file = OpenOptions::new()
        .read(true)
        .create(true)
        .append(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() && !kind.is_char_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    // Back to blocking writes (a terminal behind /dev/stdout would otherwise say EAGAIN).
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    unsafe {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// Sets a regular file's permission bits to `mode`: whatever the umask made of them at
/// creation, and for a file left by an older version.
fn set_mode(file: &File, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = file.metadata()?;
    if meta.file_type().is_file() && meta.permissions().mode() & 0o7777 != mode {
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The most of a partial last line [`trim_partial_line`] cuts: far more than any record.
/// A file with no line end in its last MiB is not an alert file, and is left alone.
const MAX_PARTIAL_LINE: u64 = 1 << 20;

/// The length of `file` up to its last newline, the file cut there if a partial line
/// follows (a write cut short whose cleanup failed, or a crash mid-line).
fn trim_partial_line(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileExt as _;
    let meta = file.metadata()?;
    let len = meta.len();
    if !meta.file_type().is_file() || len == 0 {
        return Ok(len);
    }
    let floor = len.saturating_sub(MAX_PARTIAL_LINE);
    let mut end = len;
    let mut buf = [0u8; 4096];
    loop {
        if end == floor {
            if floor == 0 {
                break; // one partial line and nothing before it
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no line end in its last MiB: not an alert file (left as it is)",
            ));
        }
        let start = end.saturating_sub(buf.len() as u64).max(floor);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end != len {
        file.set_len(end)?;
        tracing::warn!(
            cut = len - end,
            "the alert file ended in a partial line: cut back to the last whole line"
        );
    }
    Ok(end)
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl RotatingFile {
    fn open(rotation: Rotation) -> Result<Self, OutputError> {
        let mut f = Self {
            rotation,
            file: None,
            size: 0,
        };
        f.reopen().map_err(|source| {
            let path = f.rotation.path.clone();
            match source.raw_os_error() {
                Some(libc::ELOOP) => OutputError::Symlink { path },
                _ if source.kind() == io::ErrorKind::InvalidInput => OutputError::NotAFile { path },
                _ => OutputError::Open { path, source },
            }
        })?;
        Ok(f)
    }

    fn reopen(&mut self) -> io::Result<()> {
        let file = open_alert_file(&self.rotation.path, self.rotation.mode)?;
        self.size = trim_partial_line(&file)?;
        set_mode(&file, self.rotation.mode)?;
        self.file = Some(file);
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        let path = &self.rotation.path;
        if self.rotation.keep == 0 {
            ignore_missing(fs::remove_file(path))?;
        } else {
            ignore_missing(fs::remove_file(numbered(path, self.rotation.keep)))?;
            for n in (1..self.rotation.keep).rev() {
                ignore_missing(fs::rename(numbered(path, n), numbered(path, n + 1)))?;
            }
            ignore_missing(fs::rename(path, numbered(path, 1)))?;
        }
        self.reopen()
    }
}

impl LineSink for RotatingFile {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.file.is_none() {
            self.reopen()?;
        }
        if self.size > 0 && self.size.saturating_add(len) > self.rotation.max_bytes {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line);
        buf.push(b'\n');
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("alert file not open"));
        };
        match append_whole(file, &buf, self.size) {
            Ok(()) => {
                self.size += len;
                Ok(())
            }
            Err(e) => {
                self.file = None;
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }
}

/// What appending a whole line needs from the alert file (a trait so a test can make
/// writes come up short).
trait AppendFile: Write {
    /// Cuts the file back to `len` bytes.
    fn truncate_to(&mut self, len: u64) -> io::Result<()>;
}

impl AppendFile for File {
    fn truncate_to(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

/// Appends `line` (newline included) to `file`, whose whole lines end at `size`. When the
/// write fails part-way (a full disk takes what fits, then says ENOSPC) the file is cut back
/// to `size`: the next line must not be glued to the end of a broken one.
fn append_whole(file: &mut impl AppendFile, line: &[u8], size: u64) -> io::Result<()> {
    let Err(e) = file.write_all(line) else {
        return Ok(());
    };
    match file.truncate_to(size) {
        Ok(()) => Err(e),
        // The next reopen trims the partial line (`trim_partial_line`).
        Err(t) => Err(io::Error::new(
            e.kind(),
            format!("{e} (and cutting the partial line failed: {t})"),
        )),
    }
}

struct Writer {
    sink: Box<dyn LineSink>,
    format: Format,
    stats: Arc<OutputStats>,
    metrics: Option<Arc<Metrics>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        while let Some(msg) = rx.blocking_recv() {
            match msg {
                Message::Record(record) => self.write(&record),
                Message::Flush(ack) => {
                    self.flush();
                    let _ = ack.send(());
                }
            }
        }
        self.flush();
    }

    fn write(&mut self, record: &AlertEvent) {
        let line = match self.format {
            Format::Ecs => record.to_json_line(),
            Format::Ocsf => serde_json::to_value(record)
                .and_then(|ecs| serde_json::to_string(&ocsf::from_ecs(&ecs))),
        };
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                self.failed(&format!("cannot serialize a record: {e}"), None);
                return;
            }
        };
        match self.sink.write_line(line.as_bytes()) {
            Ok(()) => {
                self.stats.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.failed(&format!("cannot write a record: {e}"), Some(&line)),
        }
    }

    /// Counts a failed record and puts it (or the reason) on stderr.
    fn failed(&mut self, reason: &str, line: Option<&str>) {
        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.output_write_errors.inc();
        }
        let mut err = io::stderr().lock();
        let _ = match line {
            Some(line) => writeln!(err, "{line}"),
            None => writeln!(err, "k8s-ebpf: {reason}"),
        };
        tracing::warn!("{reason}; the record went to stderr");
    }

    fn flush(&mut self) {
        if let Err(e) = self.sink.flush() {
            tracing::warn!(error = %e, "flushing the alert output failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::{
        alert::{Action, Subject},
        capture::EventKind,
        ports::Severity,
        verdict::tests::obs,
    };

    fn record(action: Action) -> AlertEvent {
        let o = obs(
            EventKind::Inbound,
            "10.0.0.2:10250",
            "192.0.2.9:40000",
            None,
        );
        let s = Subject {
            rule_name: "kubelet",
            component: "kubelet",
            severity: Severity::Critical,
            ruleset: None,
            hostname: "node-1",
            container_id: None,
            kubernetes: None,
        };
        let mut r = AlertEvent::for_observation(&o, action, &s);
        r.timestamp = UNIX_EPOCH;
        r
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("k8s-ebpf-output-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn sender(capacity: usize, wait: Duration) -> (AlertSender, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(capacity);
        let s = AlertSender {
            tx,
            capacity,
            alert_wait: wait,
            stats: Arc::new(OutputStats::default()),
            metrics: Some(Arc::new(Metrics::new())),
        };
        (s, rx)
    }

    #[tokio::test]
    async fn events_are_dropped_before_alerts() {
        let (s, _rx) = sender(4, Duration::from_millis(20));
        assert!(s.send(record(Action::AllowedInbound)).await);
        assert!(s.send(record(Action::AllowedInbound)).await);
        // Half full: events no longer fit, alerts still do.
        assert!(!s.send(record(Action::AllowedInbound)).await);
        assert!(s.send(record(Action::UnexpectedInbound)).await);
        assert!(s.send(record(Action::UnexpectedInbound)).await);
        // Full: an alert waits briefly, then is dropped.
        assert!(!s.send(record(Action::UnexpectedInbound)).await);
        assert!(!s.try_send(record(Action::UnexpectedInbound)));
        let c = s.stats().snapshot();
        assert_eq!((c.dropped_events, c.dropped_alerts), (1, 2));
        let text = s.metrics.as_ref().expect("metrics").encode_text();
        assert!(
            text.contains("k8s_ebpf_output_dropped_total{kind=\"alert\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("k8s_ebpf_output_dropped_total{kind=\"event\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn writes_json_lines_and_rotates_by_size() {
        let dir = scratch("rotate");
        let path = dir.join("alerts.json");
        let line_len = record(Action::UnexpectedInbound)
            .to_json_line()
            .expect("json")
            .len() as u64
            + 1;
        let rotation = Rotation {
            path: path.clone(),
            max_bytes: line_len * 2,
            keep: 2,
            mode: DEFAULT_FILE_MODE,
        };
        let (tx, handle) =
            spawn(OutputSettings::new(Destination::File(rotation)), None).expect("open");
        for _ in 0..7 {
            assert!(tx.send(record(Action::UnexpectedInbound)).await);
        }
        tx.flush().await.expect("flush");
        drop(tx);
        let counts = handle.finish().await.expect("writer stops");
        assert_eq!(counts.written, 7);
        // 7 lines, 2 per file: alerts.json has 1, .1 and .2 have 2 each, the oldest 2 are gone.
        let lines = |p: &Path| {
            let text = fs::read_to_string(p).expect("read");
            for l in text.lines() {
                serde_json::from_str::<serde_json::Value>(l).expect("each line is JSON");
            }
            text.lines().count()
        };
        assert_eq!(lines(&path), 1);
        assert_eq!(lines(&numbered(&path, 1)), 2);
        assert_eq!(lines(&numbered(&path, 2)), 2);
        assert!(!numbered(&path, 3).exists());
        let _ = fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn appends_to_an_existing_file_and_flushes() {
        let dir = scratch("append");
        let path = dir.join("alerts.json");
        fs::write(&path, "{\"old\":1}\n").expect("seed");
        let (tx, handle) = spawn(
            OutputSettings::new(Destination::File(Rotation::new(&path))),
            None,
        )
        .expect("open");
        tx.send(record(Action::UnexpectedInbound)).await;
        tx.flush().await.expect("flush");
        assert_eq!(fs::read_to_string(&path).expect("read").lines().count(), 2);
        drop(tx);
        handle.finish().await.expect("stops");
        let _ = fs::remove_dir_all(dir);
    }

    /// /dev/full fails every write with ENOSPC: each record is counted and the writer
    /// keeps going.
    #[tokio::test]
    async fn a_full_disk_is_counted_and_survived() {
        let full = Path::new("/dev/full");
        if !full.exists() {
            eprintln!("skipped: no /dev/full");
            return;
        }
        let rotation = Rotation {
            path: full.to_path_buf(),
            max_bytes: u64::MAX,
            keep: 1,
            mode: DEFAULT_FILE_MODE,
        };
        let metrics = Arc::new(Metrics::new());
        let (tx, handle) = spawn(
            OutputSettings::new(Destination::File(rotation)),
            Some(Arc::clone(&metrics)),
        )
        .expect("open");
        assert!(tx.send(record(Action::UnexpectedInbound)).await);
        assert!(tx.send(record(Action::UnexpectedInbound)).await);
        tx.flush().await.expect("writer still alive");
        drop(tx);
        let counts = handle.finish().await.expect("stops");
        assert_eq!((counts.written, counts.write_errors), (0, 2));
        assert!(metrics
            .encode_text()
            .contains("k8s_ebpf_output_write_errors_total 2"));
    }

    #[test]
    fn open_failure_names_the_path() {
        let err = RotatingFile::open(Rotation::new("/nonexistent-dir/alerts.json"))
            .err()
            .expect("cannot open");
        assert!(
            err.to_string().contains("/nonexistent-dir/alerts.json"),
            "{err}"
        );
    }

    /// A file with room for `room` more bytes: a write that does not fit is cut short, the
    /// next fails with ENOSPC (what a filling disk does).
    struct FillingFile {
        data: Vec<u8>,
        room: usize,
    }

    impl Write for FillingFile {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = buf.len().min(self.room);
            self.data.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl AppendFile for FillingFile {
        fn truncate_to(&mut self, len: u64) -> io::Result<()> {
            let len = usize::try_from(len).map_err(io::Error::other)?;
            self.room += self.data.len().saturating_sub(len);
            self.data.truncate(len);
            Ok(())
        }
    }

    /// A short write then ENOSPC leaves no partial line for the next record to join: every
    /// line is whole or absent.
    #[test]
    fn a_short_write_leaves_no_partial_line() {
        let mut f = FillingFile {
            data: Vec::new(),
            room: 15,
        };
        append_whole(&mut f, b"{\"n\":1}\n", 0).expect("fits");
        let err = append_whole(&mut f, b"{\"n\":2,\"long\":true}\n", 8).expect_err("disk full");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        f.room += 100; // space comes back
        append_whole(&mut f, b"{\"n\":3}\n", 8).expect("fits again");
        let text = String::from_utf8(f.data).expect("utf-8");
        assert_eq!(text, "{\"n\":1}\n{\"n\":3}\n");
        for l in text.lines() {
            serde_json::from_str::<serde_json::Value>(l).expect("each line is JSON");
        }
    }

    /// The same against the kernel: a 64 KiB tmpfs fills up mid-line (a short write, then
    /// ENOSPC), and the file still holds whole JSON lines only.
    #[test]
    fn a_full_filesystem_keeps_whole_lines() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        struct Mounted(PathBuf);
        impl Drop for Mounted {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
                let _ = fs::remove_dir_all(&self.0);
            }
        }
        let dir = scratch("tmpfs");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "k8s-ebpf-test"])
            .arg(&dir)
            .status();
        if !mounted.is_ok_and(|s| s.success()) {
            eprintln!("skipped: cannot mount a tmpfs on {}", dir.display());
            let _ = fs::remove_dir_all(&dir);
            return;
        }
        let dir = Mounted(dir);
        let path = dir.0.join("alerts.json");
        let mut rotation = Rotation::new(&path);
        rotation.max_bytes = u64::MAX;
        let mut f = RotatingFile::open(rotation).expect("open");
        let pad = "x".repeat(1000);
        let (mut written, mut failed) = (0, 0);
        for n in 0..200 {
            let line = format!("{{\"n\":\"{n:03}\",\"pad\":\"{pad}\"}}");
            match f.write_line(line.as_bytes()) {
                Ok(()) => written += 1,
                Err(_) => failed += 1,
            }
        }
        assert!(
            written > 0 && failed > 0,
            "{written} written, {failed} failed"
        );
        let text = fs::read_to_string(&path).expect("read");
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "a partial last line"
        );
        for l in text.lines() {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not a whole JSON line ({e}): {l:.60}…"));
        }
        assert_eq!(text.lines().count(), written);
    }

    #[test]
    fn alert_files_are_private_by_default() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = scratch("mode");
        let path = dir.join("alerts.json");
        let mut rotation = Rotation::new(&path);
        rotation.max_bytes = 4;
        let mut f = RotatingFile::open(rotation).expect("open");
        f.write_line(b"{}").expect("write");
        f.write_line(b"{}").expect("write, after a rotation");
        for p in [path.clone(), numbered(&path, 1)] {
            let mode = fs::metadata(&p).expect("stat").permissions().mode() & 0o7777;
            assert_eq!(mode, 0o600, "{} is {mode:o}", p.display());
        }
        let _ = fs::remove_dir_all(dir);
    }

    /// A symbolic link at the alert path is refused: at start, and when the file is
    /// reopened after a failed write (where one could have been planted since).
    #[test]
    fn never_follows_a_symlink_at_the_path() {
        use std::os::unix::fs::symlink;
        let dir = scratch("symlink");
        let victim = dir.join("victim");
        fs::write(&victim, "precious\n").expect("seed");
        let path = dir.join("alerts.json");
        symlink(&victim, &path).expect("symlink");
        let err = RotatingFile::open(Rotation::new(&path))
            .err()
            .expect("a symlink is refused");
        assert!(err.to_string().contains("symbolic link"), "{err}");

        fs::remove_file(&path).expect("rm");
        let mut f = RotatingFile::open(Rotation::new(&path)).expect("open");
        fs::remove_file(&path).expect("rm");
        symlink(&victim, &path).expect("symlink");
        f.file = None; // as after a failed write: the next line reopens the path
        assert!(f.write_line(b"{}").is_err(), "wrote through the symlink");
        assert_eq!(fs::read_to_string(&victim).expect("read"), "precious\n");

        // Planted while the file is open, then a rotation: the link is renamed aside (rename
        // does not follow it) and a new regular file is created in its place.
        fs::remove_file(&path).expect("rm");
        let mut rotation = Rotation::new(&path);
        rotation.max_bytes = 4;
        let mut f = RotatingFile::open(rotation).expect("open");
        f.write_line(b"{}").expect("write");
        fs::remove_file(&path).expect("rm");
        symlink(&victim, &path).expect("symlink");
        f.write_line(b"{}").expect("write after a rotation");
        assert!(fs::symlink_metadata(&path).expect("stat").is_file());
        assert_eq!(fs::read_to_string(&victim).expect("read"), "precious\n");
        let _ = fs::remove_dir_all(dir);
    }

    /// A partial last line left before this process (a crash mid-write, or a cut-back that
    /// failed) is cut when the file is opened, not continued by the next record.
    #[test]
    fn a_partial_line_found_at_open_is_cut() {
        let dir = scratch("partial");
        let path = dir.join("alerts.json");
        fs::write(&path, "{\"old\":1}\n{\"brok").expect("seed");
        let mut f = RotatingFile::open(Rotation::new(&path)).expect("open");
        f.write_line(b"{\"new\":2}").expect("write");
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            "{\"old\":1}\n{\"new\":2}\n"
        );
        let _ = fs::remove_dir_all(dir);
    }

    /// A file that is not an alert file (no line end in its last MiB) is not cut.
    #[test]
    fn a_file_without_line_ends_is_left_alone() {
        let dir = scratch("noline");
        let path = dir.join("blob");
        let blob = vec![b'x'; (MAX_PARTIAL_LINE + 10) as usize];
        fs::write(&path, &blob).expect("seed");
        let err = RotatingFile::open(Rotation::new(&path))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("not an alert file"), "{err}");
        let meta = fs::metadata(&path).expect("stat");
        assert_eq!(meta.len(), blob.len() as u64);
        use std::os::unix::fs::PermissionsExt as _;
        assert_ne!(
            meta.permissions().mode() & 0o777,
            DEFAULT_FILE_MODE,
            "chmodded"
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn keep_zero_truncates() {
        let dir = scratch("keep0");
        let path = dir.join("a.json");
        let mut f = RotatingFile::open(Rotation {
            path: path.clone(),
            max_bytes: 10,
            keep: 0,
            mode: DEFAULT_FILE_MODE,
        })
        .expect("open");
        f.write_line(b"0123456789").expect("write");
        f.write_line(b"abc").expect("write");
        assert_eq!(fs::read_to_string(&path).expect("read"), "abc\n");
        assert!(!numbered(&path, 1).exists());
        let _ = fs::remove_dir_all(dir);
    }
}
