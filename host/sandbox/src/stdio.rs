//! Where a guest's stdout and stderr go: captured in memory up to a cap (tool calls, `describe`,
//! [`crate::Sandbox::exec`]), or streamed to host writers as the guest writes them
//! ([`crate::Sandbox::exec_streaming`], used by `keel exec`; [`crate::Sandbox::call_streaming`], used
//! by `keel exec --lang` to show a code step's output as it is printed).
//!
//! Streaming uses wasmtime-wasi's [`AsyncStdoutStream`]: the guest may have at most
//! [`STREAM_BUDGET`] bytes in flight per stream; past that its writes wait (inside an async host
//! call, so the call's deadline still stops it) until the host writer has taken them. Host memory
//! stays bounded whatever the guest writes, and a slow reader slows the guest down instead of
//! growing a buffer. A streamed *tool call* stops at its `max_output_bytes` per stream
//! ([`Capped`]); a command's output (`keel exec FILE.wasm`) is its product and is never cut.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::AsyncWrite;
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::cli::{AsyncStdoutStream, StdoutStream};
use wasmtime_wasi::p2::OutputStream;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

/// Bytes of one stream that a guest may have written and the host writer not yet taken.
pub const STREAM_BUDGET: usize = 64 << 10;

/// A host writer a guest's output is streamed to.
pub type OutputWriter = Box<dyn AsyncWrite + Send + Sync + Unpin>;

/// How a store's guest output is handled, chosen when the store is built.
pub(crate) enum StdioMode {
    /// Kept in memory: at most this many bytes of each stream.
    Capture(usize),
    /// Written to these host writers (stdout, stderr) as the guest writes them.
    Stream(OutputWriter, OutputWriter),
}

/// One guest output stream as the host keeps it after building the store.
pub(crate) enum GuestOutput {
    /// Captured bytes.
    Captured(MemoryOutputPipe),
    /// A handle on the streamed pipe (the guest's handles are others), kept to drain it.
    Streamed(Box<dyn OutputStream>),
}

impl StdioMode {
    /// Give the guest its stdout and stderr; returns the host's side of each.
    pub(crate) fn attach(self, wasi: &mut WasiCtxBuilder) -> (GuestOutput, GuestOutput) {
        match self {
            StdioMode::Capture(capacity) => {
                let (stdout, stderr) = (MemoryOutputPipe::new(capacity), MemoryOutputPipe::new(capacity));
                wasi.stdout(stdout.clone()).stderr(stderr.clone());
                (GuestOutput::Captured(stdout), GuestOutput::Captured(stderr))
            }
            StdioMode::Stream(stdout, stderr) => {
                let (stdout, stderr) = (
                    AsyncStdoutStream::new(STREAM_BUDGET, stdout),
                    AsyncStdoutStream::new(STREAM_BUDGET, stderr),
                );
                let handles = (
                    GuestOutput::Streamed(stdout.p2_stream()),
                    GuestOutput::Streamed(stderr.p2_stream()),
                );
                wasi.stdout(stdout).stderr(stderr);
                handles
            }
        }
    }
}

impl GuestOutput {
    /// What was captured (nothing for a streamed output: it went to its writer).
    pub(crate) fn captured(&self) -> Vec<u8> {
        match self {
            GuestOutput::Captured(pipe) => pipe.contents().to_vec(),
            GuestOutput::Streamed(_) => Vec::new(),
        }
    }

    /// Wait until every byte the guest wrote has reached the writer and the writer is flushed.
    /// Dropping the store without this would lose writes still queued: the pipe's writer task is
    /// aborted with its last handle. A writer that failed (a closed pipe) ends the wait at once.
    pub(crate) async fn drain(&mut self) {
        if let GuestOutput::Streamed(handle) = self
            && handle.flush().is_ok()
        {
            // Ready again once the queued writes, then the flush, are done (or the writer failed).
            handle.ready().await;
        }
    }
}

/// A streamed tool call's writer, bounded: the first `cap` bytes pass through; the write that
/// would go past it passes what fits, then one line saying the output was cut, and every later
/// write fails (`BrokenPipe`, as a closed pipe does), so the guest learns that its output goes
/// nowhere.
pub(crate) struct Capped {
    inner: OutputWriter,
    left: usize,
    cap: usize,
    /// Bytes passed to `inner` so far (the note not counted), for the call's receipt.
    passed: Arc<AtomicU64>,
    /// The line saying the output was cut, while part of it is still to be written.
    note: Option<(Vec<u8>, usize)>,
    cut: bool,
}

impl Capped {
    /// `inner`, cut at `cap` bytes; `passed` counts the bytes that reach it.
    pub(crate) fn new(inner: OutputWriter, cap: usize, passed: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            left: cap,
            cap,
            passed,
            note: None,
            cut: false,
        }
    }

    /// Write what is left of the note; ready when it has all been written.
    fn poll_note(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((note, written)) = &mut self.note {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &note[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
            if *written == note.len() {
                self.note = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Capped {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_note(cx))?;
        if this.cut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("the call printed more than {} bytes (max_output_bytes)", this.cap),
            )));
        }
        if this.left > 0 {
            let fits = buf.len().min(this.left);
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..fits]))?;
            this.left -= n;
            this.passed.fetch_add(n as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(n));
        }
        // Past the cap: say so once, then refuse. The bytes of `buf` are taken (and dropped) so
        // the note is written whole before the error.
        this.cut = true;
        let note = format!("\n[keel: output cut at {} bytes (max_output_bytes)]\n", this.cap);
        this.note = Some((note.into_bytes(), 0));
        ready!(this.poll_note(cx))?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_note(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_note(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
