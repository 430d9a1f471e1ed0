//! Where a guest's stdout and stderr go: captured in memory up to a cap (tool calls, `describe`,
//! [`crate::Sandbox::exec`]), or streamed to host writers as the guest writes them
//! ([`crate::Sandbox::exec_streaming`], used by `keel exec`; [`crate::Sandbox::call_streaming`], used
//! by `keel exec --lang` to show a code step's output as it is printed).
//!
//! Streaming uses wasmtime-wasi's [`AsyncStdoutStream`]: the guest may have at most
//! [`STREAM_BUDGET`] bytes in flight per stream; past that its writes wait (inside an async host
//! call, so the call's deadline still stops it) until the host writer has taken them. Host memory
//! stays bounded whatever the guest writes, and a slow reader slows the guest down instead of
//! growing a buffer.

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
