//! `hostile` — an adversarial test plugin for the Keel sandbox. Each tool is one hostile behaviour.
//!
//! Filesystem tools use raw `wasi:filesystem` calls on the preopened descriptor (`dir` is the guest
//! path of a preopen, e.g. `/rw`), so they test the *host's* checks, not wasi-libc's lexical ones.
//! Each filesystem tool makes one or more escape *attempts*: if any attempt succeeds it returns
//! `{"escaped": true, "steps": [...]}` (a sandbox bug); otherwise it fails with `denied` (capability
//! `filesystem`) when the host refused with an access error, or `failed` for other errors, and the
//! message lists every step with the WASI error code the host returned.
//!
//! Tools (one line each):
//! - `ok` — returns `{"ok": true}`; used to check that the next call after an attack succeeds.
//! - `preopens` — lists the preopened directories and whether each is writable.
//! - `traverse_read` — `open_at(dir, path)` + read with a raw `..` path (e.g. `../secret.txt`).
//! - `traverse_create` — `open_at(dir, path, CREATE)` + write through a raw `..` path.
//! - `absolute_read` — `open_at(dir, path)` + read with an absolute path (e.g. `/etc/passwd`).
//! - `symlink_escape` — `symlink_at(target, link)` in a writable dir pointing outside, then read (and
//!   optionally write) through it with `SYMLINK_FOLLOW`, and open it with no-follow.
//! - `symlink_trailing_slash` — symlink pointing outside, then `link/` (trailing slash, no-follow flags)
//!   opened as a directory and listed, `stat`ed, and a file created under `link/`.
//! - `hardlink_escape` — `link_at` a file from `from_dir` (read-only grant) into `to_dir` (writable),
//!   then write through the new link.
//! - `rename_escape` — `rename_at` a file from `from_dir` into `to_dir` (either direction).
//! - `truncate_readonly` — open a file in a read-only grant with `TRUNCATE` (read and write flags),
//!   `set_size(0)` on a read-only descriptor.
//! - `write_readonly` — write to a file in a read-only grant: open for write, `write` and
//!   `write_via_stream` on a read-only descriptor, `set_times_at`.
//! - `create_in_readonly` — create a file / directory / symlink in a read-only grant, unlink a file there.
//! - `http_get` — raw `wasi:http` GET of `url`, following redirects itself (each hop a new request);
//!   returns status/body or `denied` (capability `network`) with the host's error code.
//! - `infinite_loop` — spins forever.
//! - `memory_bomb` — allocates and touches 1 MiB blocks forever.
//! - `deep_recursion` — recurses with large frames until the stack overflows.
//! - `huge_output` — returns a JSON string of `mb` MiB (default 50).
//! - `huge_host_arg` — calls the raw `keel:plugin/host.log` import with a pointer near the end of
//!   linear memory (or 0) and length 0x7fff_ffff.
//! - `log_flood` — sends `lines` log lines (default 100000).
//! - `stdout_flood` — writes `mb` MiB (default 8) to stdout and stderr.
//! - `panic` — panics (a guest trap).
//! - `counter` — increments a static and returns it: `1` on every call unless state leaks between calls.
//! - `read_env` — returns the value of an environment variable (or the error) and the names visible.
//! - `open_many`, `open_path`, `list`, `replace_with_symlink` — see `fs.rs`.
//! - `spin_ms` — leaves an execution marker in `dir`, then busy-computes `ms` ms (see `soak.rs`).

use std::hint::black_box;

mod fs;
mod soak;

use keel_sdk::prelude::*;
use wasip2::filesystem::preopens::get_directories;
use wasip2::filesystem::types::{
    Descriptor, DescriptorFlags, DescriptorType, ErrorCode, NewTimestamp, OpenFlags, PathFlags,
};

// ---------------------------------------------------------------------------------------------
// Helpers

/// A preopened directory by its exact guest path.
fn preopen(dir: &str) -> Result<Descriptor, ToolError> {
    let mut names = Vec::new();
    for (d, name) in get_directories() {
        if name == dir {
            return Ok(d);
        }
        names.push(name);
    }
    Err(ToolError::invalid_input(format!(
        "no preopen `{dir}`; preopens: {names:?}"
    )))
}

/// Record of what an attack tried and what the host answered.
#[derive(Default)]
struct Attempt {
    steps: Vec<String>,
    escaped: bool,
    refused: bool,
    content: Option<String>,
}

impl Attempt {
    /// A setup or attack step; `attack` marks steps whose success is an escape.
    fn step<T>(&mut self, what: &str, attack: bool, r: Result<T, ErrorCode>) -> Option<T> {
        match r {
            Ok(v) => {
                self.steps.push(format!("{what}: ok"));
                if attack {
                    self.escaped = true;
                }
                Some(v)
            }
            Err(code) => {
                if matches!(code, ErrorCode::Access | ErrorCode::NotPermitted | ErrorCode::ReadOnly) {
                    self.refused = true;
                }
                self.steps.push(format!("{what}: {}", code.name()));
                None
            }
        }
    }

    fn finish(self, target: &str) -> Result<Value, ToolError> {
        let steps = self.steps.join("; ");
        if self.escaped {
            Ok(json!({ "escaped": true, "steps": self.steps, "content": self.content }))
        } else if self.refused {
            Err(ToolError::denied(
                "filesystem",
                target,
                format!("refused by the host: {steps}"),
            ))
        } else {
            Err(ToolError::failed(format!("failed: {steps}")))
        }
    }
}

/// Read a whole (small) file from a descriptor.
fn read_all(file: &Descriptor) -> Result<String, ErrorCode> {
    let mut out = Vec::new();
    loop {
        let (chunk, eof) = file.read(65536, out.len() as u64)?;
        out.extend_from_slice(&chunk);
        if eof || chunk.is_empty() || out.len() > 1 << 20 {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
    }
}

const PWNED: &[u8] = b"pwned by hostile";

// ---------------------------------------------------------------------------------------------
// Filesystem attacks

/// Arguments naming a preopen and a raw path inside (or not) it.
#[derive(Deserialize, JsonSchema)]
struct DirPath {
    /// Guest path of the preopen to start from (e.g. `/rw`).
    dir: String,
    /// Raw path passed to the host unchanged.
    path: String,
}

fn open_read(dir: &str, path: &str) -> Result<Value, ToolError> {
    let d = preopen(dir)?;
    let mut a = Attempt::default();
    if let Some(f) = a.step(
        &format!("open_at({path}, read)"),
        false,
        d.open_at(
            PathFlags::SYMLINK_FOLLOW,
            path,
            OpenFlags::empty(),
            DescriptorFlags::READ,
        ),
    ) {
        a.content = a.step("read", true, read_all(&f));
    }
    a.step(
        &format!("stat_at({path})"),
        false,
        d.stat_at(PathFlags::SYMLINK_FOLLOW, path).map(|_| ()),
    );
    a.finish(path)
}

fn traverse_read(_: &Context, i: DirPath) -> Result<Value, ToolError> {
    open_read(&i.dir, &i.path)
}

fn absolute_read(_: &Context, i: DirPath) -> Result<Value, ToolError> {
    open_read(&i.dir, &i.path)
}

fn traverse_create(_: &Context, i: DirPath) -> Result<Value, ToolError> {
    let d = preopen(&i.dir)?;
    let mut a = Attempt::default();
    let opened = d.open_at(PathFlags::empty(), &i.path, OpenFlags::CREATE, DescriptorFlags::WRITE);
    if let Some(f) = a.step(&format!("open_at({}, create+write)", i.path), true, opened) {
        a.step("write", true, f.write(PWNED, 0));
    }
    a.step(
        &format!("create_directory_at({}.d)", i.path),
        true,
        d.create_directory_at(&format!("{}.d", i.path)),
    );
    a.finish(&i.path)
}

/// Arguments of `symlink_escape` and `symlink_trailing_slash`.
#[derive(Deserialize, JsonSchema)]
struct SymlinkInput {
    /// Writable preopen to create the link in.
    dir: String,
    /// Name of the link inside `dir`.
    link: String,
    /// Where the link points (e.g. `../outside/secret.txt` or an absolute host path).
    target: String,
    /// Also try to write through the link.
    #[serde(default)]
    write: bool,
}

fn symlink_escape(_: &Context, i: SymlinkInput) -> Result<Value, ToolError> {
    let d = preopen(&i.dir)?;
    let mut a = Attempt::default();
    let linked = a.step(
        &format!("symlink_at({} -> {})", i.link, i.target),
        false,
        d.symlink_at(&i.target, &i.link),
    );
    if linked.is_none() {
        // The host refused to create the link: nothing to follow (opening `link` now would only
        // create or miss a plain file inside the grant).
        return a.finish(&i.target);
    }
    let opened = d.open_at(
        PathFlags::SYMLINK_FOLLOW,
        &i.link,
        OpenFlags::empty(),
        DescriptorFlags::READ,
    );
    if let Some(f) = a.step("open_at(link, follow, read)", false, opened) {
        a.content = a.step("read through link", true, read_all(&f));
    }
    let opened = d.open_at(PathFlags::empty(), &i.link, OpenFlags::empty(), DescriptorFlags::READ);
    // Reading the *link itself* is fine; reading the target's bytes is an escape.
    if let Some(f) = a.step("open_at(link, nofollow, read)", false, opened)
        && let Some(c) = a.step("read through nofollow link", false, read_all(&f))
        && !c.is_empty()
        && c != i.target
    {
        a.escaped = true;
        a.content = Some(c);
    }
    a.step(
        "stat_at(link, follow)",
        true,
        d.stat_at(PathFlags::SYMLINK_FOLLOW, &i.link).map(|_| ()),
    );
    if i.write {
        let opened = d.open_at(
            PathFlags::SYMLINK_FOLLOW,
            &i.link,
            OpenFlags::CREATE,
            DescriptorFlags::WRITE,
        );
        if let Some(f) = a.step("open_at(link, follow, write)", true, opened) {
            a.step("write through link", true, f.write(PWNED, 0));
        }
        let opened = d.open_at(
            PathFlags::SYMLINK_FOLLOW,
            &i.link,
            OpenFlags::TRUNCATE,
            DescriptorFlags::WRITE,
        );
        a.step("open_at(link, follow, truncate)", true, opened.map(|_| ()));
    }
    a.finish(&i.target)
}

fn symlink_trailing_slash(_: &Context, i: SymlinkInput) -> Result<Value, ToolError> {
    let d = preopen(&i.dir)?;
    let mut a = Attempt::default();
    let linked = a.step(
        &format!("symlink_at({} -> {})", i.link, i.target),
        false,
        d.symlink_at(&i.target, &i.link),
    );
    if linked.is_none() {
        return a.finish(&i.target);
    }
    let slash = format!("{}/", i.link);
    let opened = d.open_at(PathFlags::empty(), &slash, OpenFlags::DIRECTORY, DescriptorFlags::READ);
    if let Some(sub) = a.step(&format!("open_at({slash}, nofollow, directory)"), true, opened)
        && let Some(stream) = a.step("read_directory", true, sub.read_directory())
    {
        let mut names = Vec::new();
        while let Ok(Some(e)) = stream.read_directory_entry() {
            names.push(e.name);
        }
        a.content = Some(names.join(","));
    }
    // `stat` of the link itself is fine (type symlink); a directory type means the host followed it.
    for probe in [slash.clone(), format!("{}/.", i.link)] {
        for (flags, name) in [(PathFlags::empty(), "nofollow"), (PathFlags::SYMLINK_FOLLOW, "follow")] {
            if let Some(st) = a.step(&format!("stat_at({probe}, {name})"), false, d.stat_at(flags, &probe)) {
                a.steps.push(format!("stat_at({probe}, {name}) type: {:?}", st.type_));
                if st.type_ != DescriptorType::SymbolicLink {
                    a.escaped = true;
                }
            }
        }
    }
    let inner = format!("{}/pwned.txt", i.link);
    let opened = d.open_at(PathFlags::empty(), &inner, OpenFlags::CREATE, DescriptorFlags::WRITE);
    if let Some(f) = a.step(&format!("open_at({inner}, create)"), true, opened) {
        a.step("write", true, f.write(PWNED, 0));
    }
    a.step(
        &format!("create_directory_at({}/pwned.d)", i.link),
        true,
        d.create_directory_at(&format!("{}/pwned.d", i.link)),
    );
    a.finish(&i.target)
}

/// Arguments of `hardlink_escape` and `rename_escape`.
#[derive(Deserialize, JsonSchema)]
struct TwoDirs {
    /// Source preopen.
    from_dir: String,
    /// Source path inside `from_dir`.
    from_path: String,
    /// Destination preopen.
    to_dir: String,
    /// Destination path inside `to_dir`.
    to_path: String,
}

fn hardlink_escape(_: &Context, i: TwoDirs) -> Result<Value, ToolError> {
    let from = preopen(&i.from_dir)?;
    let to = preopen(&i.to_dir)?;
    let mut a = Attempt::default();
    a.step(
        &format!("link_at({}:{} -> {}:{})", i.from_dir, i.from_path, i.to_dir, i.to_path),
        true,
        from.link_at(PathFlags::empty(), &i.from_path, &to, &i.to_path),
    );
    let opened = to.open_at(
        PathFlags::empty(),
        &i.to_path,
        OpenFlags::empty(),
        DescriptorFlags::WRITE,
    );
    if let Some(f) = a.step("open_at(new link, write)", false, opened) {
        a.step("write through new link", false, f.write(PWNED, 0));
    }
    a.finish(&i.from_path)
}

fn rename_escape(_: &Context, i: TwoDirs) -> Result<Value, ToolError> {
    let from = preopen(&i.from_dir)?;
    let to = preopen(&i.to_dir)?;
    let mut a = Attempt::default();
    a.step(
        &format!(
            "rename_at({}:{} -> {}:{})",
            i.from_dir, i.from_path, i.to_dir, i.to_path
        ),
        true,
        from.rename_at(&i.from_path, &to, &i.to_path),
    );
    a.finish(&i.from_path)
}

fn truncate_readonly(_: &Context, i: DirPath) -> Result<Value, ToolError> {
    let d = preopen(&i.dir)?;
    let mut a = Attempt::default();
    let p = i.path.as_str();
    a.step(
        "open_at(truncate, read)",
        true,
        d.open_at(PathFlags::empty(), p, OpenFlags::TRUNCATE, DescriptorFlags::READ)
            .map(|_| ()),
    );
    let opened = d.open_at(PathFlags::empty(), p, OpenFlags::TRUNCATE, DescriptorFlags::WRITE);
    if let Some(f) = a.step("open_at(truncate, write)", true, opened) {
        a.step("write", true, f.write(PWNED, 0));
    }
    let opened = d.open_at(
        PathFlags::empty(),
        p,
        OpenFlags::CREATE | OpenFlags::TRUNCATE,
        DescriptorFlags::READ | DescriptorFlags::WRITE,
    );
    a.step("open_at(create+truncate, read+write)", true, opened.map(|_| ()));
    let opened = d.open_at(PathFlags::empty(), p, OpenFlags::empty(), DescriptorFlags::READ);
    if let Some(f) = a.step("open_at(read)", false, opened) {
        a.step("set_size(0) on read-only descriptor", true, f.set_size(0));
    }
    a.finish(p)
}

/// Arguments of `write_readonly`.
#[derive(Deserialize, JsonSchema)]
struct WriteInput {
    /// Read-only preopen.
    dir: String,
    /// Existing file inside it.
    path: String,
}

fn write_readonly(_: &Context, i: WriteInput) -> Result<Value, ToolError> {
    let d = preopen(&i.dir)?;
    let mut a = Attempt::default();
    let p = i.path.as_str();
    let opened = d.open_at(PathFlags::empty(), p, OpenFlags::empty(), DescriptorFlags::WRITE);
    if let Some(f) = a.step("open_at(write)", true, opened) {
        a.step("write", true, f.write(PWNED, 0));
    }
    let opened = d.open_at(PathFlags::empty(), p, OpenFlags::empty(), DescriptorFlags::READ);
    if let Some(f) = a.step("open_at(read)", false, opened) {
        a.step("write on read-only descriptor", true, f.write(PWNED, 0));
        if let Some(stream) = a.step("write_via_stream on read-only descriptor", false, f.write_via_stream(0)) {
            let r = stream.blocking_write_and_flush(PWNED);
            if r.is_ok() {
                a.steps.push("stream write: ok".into());
                a.escaped = true;
            } else {
                a.steps.push("stream write: error".into());
            }
        }
        if let Some(stream) = a.step(
            "append_via_stream on read-only descriptor",
            false,
            f.append_via_stream(),
        ) {
            if stream.blocking_write_and_flush(PWNED).is_ok() {
                a.steps.push("append stream write: ok".into());
                a.escaped = true;
            } else {
                a.steps.push("append stream write: error".into());
            }
        }
        a.step(
            "set_times on read-only descriptor",
            true,
            f.set_times(NewTimestamp::Now, NewTimestamp::Now),
        );
    }
    a.step(
        "set_times_at",
        true,
        d.set_times_at(PathFlags::empty(), p, NewTimestamp::Now, NewTimestamp::Now),
    );
    a.finish(p)
}

fn create_in_readonly(_: &Context, i: DirPath) -> Result<Value, ToolError> {
    let d = preopen(&i.dir)?;
    let mut a = Attempt::default();
    let p = i.path.as_str();
    let opened = d.open_at(PathFlags::empty(), p, OpenFlags::CREATE, DescriptorFlags::WRITE);
    if let Some(f) = a.step(&format!("open_at({p}, create+write)"), true, opened) {
        a.step("write", true, f.write(PWNED, 0));
    }
    let opened = d.open_at(
        PathFlags::empty(),
        &format!("{p}.r"),
        OpenFlags::CREATE,
        DescriptorFlags::READ,
    );
    a.step(&format!("open_at({p}.r, create, read-only)"), true, opened.map(|_| ()));
    a.step(
        &format!("create_directory_at({p}.d)"),
        true,
        d.create_directory_at(&format!("{p}.d")),
    );
    a.step(
        &format!("symlink_at({p}.l)"),
        true,
        d.symlink_at("target", &format!("{p}.l")),
    );
    a.finish(p)
}

/// Arguments of `delete_in_readonly`.
#[derive(Deserialize, JsonSchema)]
struct DeleteInput {
    /// Read-only preopen.
    dir: String,
    /// Existing file inside it.
    file: String,
    /// Existing (empty) directory inside it, if any.
    #[serde(default)]
    subdir: Option<String>,
}

fn delete_in_readonly(_: &Context, i: DeleteInput) -> Result<Value, ToolError> {
    let d = preopen(&i.dir)?;
    let mut a = Attempt::default();
    a.step(&format!("unlink_file_at({})", i.file), true, d.unlink_file_at(&i.file));
    a.step(
        &format!("rename_at({0} -> {0}.moved)", i.file),
        true,
        d.rename_at(&i.file, &d, &format!("{}.moved", i.file)),
    );
    if let Some(sub) = &i.subdir {
        a.step(&format!("remove_directory_at({sub})"), true, d.remove_directory_at(sub));
    }
    a.finish(&i.file)
}

#[derive(Serialize, JsonSchema)]
struct PreopenInfo {
    path: String,
    writable: bool,
}

fn preopens(_: &Context, _: Value) -> Result<Vec<PreopenInfo>, ToolError> {
    Ok(get_directories()
        .into_iter()
        .map(|(d, path)| PreopenInfo {
            path,
            writable: d
                .get_flags()
                .map(|f| f.contains(DescriptorFlags::MUTATE_DIRECTORY))
                .unwrap_or(false),
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Network

mod net {
    use keel_sdk::prelude::*;
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
    use wasip2::io::streams::StreamError;

    /// Split `http://authority/path` into (authority, path).
    fn split(url: &str) -> Result<(bool, String, String), ToolError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| ToolError::invalid_input(format!("bad url {url}")))?;
        let end = rest.find('/').unwrap_or(rest.len());
        let path = if end == rest.len() {
            "/".to_string()
        } else {
            rest[end..].to_string()
        };
        Ok((scheme == "https", rest[..end].to_string(), path))
    }

    fn host_of(authority: &str) -> String {
        if authority.starts_with('[') {
            authority.split(']').next().map(|h| format!("{h}]")).unwrap_or_default()
        } else {
            authority.split(':').next().unwrap_or_default().to_string()
        }
    }

    fn refused(authority: &str, where_: &str, code: ErrorCode) -> ToolError {
        match code {
            ErrorCode::HttpRequestDenied | ErrorCode::DestinationIpProhibited => ToolError::denied(
                "network",
                host_of(authority),
                format!("the host refused the request to {authority} ({where_}): {code:?}"),
            ),
            other => ToolError::failed(format!("request to {authority} failed ({where_}): {other:?}")),
        }
    }

    /// One GET; returns (status, location, body).
    fn get_once(url: &str, headers: &[(String, String)]) -> Result<(u16, Option<String>, String), ToolError> {
        let (https, authority, path) = split(url)?;
        let entries: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect();
        let fields = Fields::from_list(&entries)
            .map_err(|e| ToolError::invalid_input(format!("the host refused the headers: {e:?}")))?;
        let req = OutgoingRequest::new(fields);
        req.set_method(&Method::Get).map_err(|()| ToolError::failed("method"))?;
        req.set_scheme(Some(&if https { Scheme::Https } else { Scheme::Http }))
            .map_err(|()| ToolError::failed("scheme"))?;
        req.set_authority(Some(&authority))
            .map_err(|()| ToolError::invalid_input(format!("authority {authority}")))?;
        req.set_path_with_query(Some(&path))
            .map_err(|()| ToolError::invalid_input(format!("path {path}")))?;
        let body = req.body().map_err(|()| ToolError::failed("body"))?;
        let fut = outgoing_handler::handle(req, None).map_err(|c| refused(&authority, "handle", c))?;
        OutgoingBody::finish(body, None).map_err(|c| refused(&authority, "finish", c))?;
        fut.subscribe().block();
        let resp = match fut.get() {
            Some(Ok(Ok(r))) => r,
            Some(Ok(Err(code))) => return Err(refused(&authority, "response", code)),
            _ => return Err(ToolError::failed("no response")),
        };
        let status = resp.status();
        let location = resp
            .headers()
            .entries()
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("location"))
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
        let incoming = resp.consume().map_err(|()| ToolError::failed("consume"))?;
        let mut data = Vec::new();
        {
            let stream = incoming.stream().map_err(|()| ToolError::failed("stream"))?;
            loop {
                match stream.blocking_read(65536) {
                    Ok(chunk) => data.extend_from_slice(&chunk),
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(e)) => {
                        return Err(ToolError::failed(format!("body: {}", e.to_debug_string())));
                    }
                }
                if data.len() > 1 << 20 {
                    break;
                }
            }
        }
        drop(incoming);
        Ok((status, location, String::from_utf8_lossy(&data).into_owned()))
    }

    /// Arguments of `http_get`.
    #[derive(Deserialize, JsonSchema)]
    pub struct HttpGet {
        /// URL to fetch.
        url: String,
        /// Follow redirects (default true, at most 5).
        #[serde(default = "yes")]
        follow_redirects: bool,
        /// Extra request headers, e.g. a spoofed `host`.
        #[serde(default)]
        headers: Vec<(String, String)>,
    }

    fn yes() -> bool {
        true
    }

    pub fn http_get(_: &Context, i: HttpGet) -> Result<Value, ToolError> {
        let mut url = i.url;
        let mut hops = vec![url.clone()];
        for _ in 0..6 {
            let (status, location, body) = get_once(&url, &i.headers)?;
            match location {
                Some(next) if i.follow_redirects && (300..400).contains(&status) => {
                    url = if next.contains("://") {
                        next
                    } else {
                        let (https, authority, _) = split(&url)?;
                        format!("{}://{authority}{next}", if https { "https" } else { "http" })
                    };
                    hops.push(url.clone());
                }
                _ => return Ok(json!({ "status": status, "body": body, "hops": hops })),
            }
        }
        Err(ToolError::failed("too many redirects"))
    }
}

// ---------------------------------------------------------------------------------------------
// Resource exhaustion

fn infinite_loop(_: &Context, _: Value) -> Result<Value, ToolError> {
    let mut i: u64 = 0;
    loop {
        i = black_box(i.wrapping_add(1));
    }
}

fn memory_bomb(_: &Context, _: Value) -> Result<Value, ToolError> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; 1 << 20];
        for i in (0..block.len()).step_by(4096) {
            block[i] = 1;
        }
        hoard.push(black_box(block));
    }
}

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth; 128]);
    if black_box(depth) == u64::MAX {
        return frame[0];
    }
    recurse(depth + 1).wrapping_add(frame[(depth % 128) as usize])
}

fn deep_recursion(_: &Context, _: Value) -> Result<Value, ToolError> {
    Ok(json!({ "depth": recurse(0) }))
}

/// Arguments of `huge_output` and `stdout_flood`.
#[derive(Deserialize, JsonSchema)]
struct Size {
    /// Size in MiB.
    #[serde(default)]
    mb: Option<usize>,
}

fn huge_output(_: &Context, i: Size) -> Result<String, ToolError> {
    Ok("x".repeat(i.mb.unwrap_or(50) << 20))
}

fn stdout_flood(_: &Context, i: Size) -> Result<Value, ToolError> {
    use std::io::Write;
    let line = [b'o'; 1024];
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    for _ in 0..(i.mb.unwrap_or(8) << 10) {
        let _ = out.write_all(&line);
        let _ = err.write_all(&line);
    }
    let _ = out.flush();
    Ok(json!({ "written": true }))
}

#[link(wasm_import_module = "keel:plugin/host@0.1.0")]
unsafe extern "C" {
    /// The raw canonical-ABI `log` import: (level, string pointer, string length).
    #[link_name = "log"]
    fn raw_log(level: i32, ptr: *const u8, len: usize);
}

/// Arguments of `huge_host_arg`.
#[derive(Deserialize, JsonSchema)]
struct HugeArg {
    /// `end` (pointer 8 bytes before the end of memory, default) or `zero` (pointer 0).
    #[serde(default)]
    at: Option<String>,
}

fn huge_host_arg(_: &Context, i: HugeArg) -> Result<Value, ToolError> {
    let end = core::arch::wasm32::memory_size(0) * 65536;
    let ptr = match i.at.as_deref() {
        Some("zero") => 0,
        _ => end - 8,
    };
    // SAFETY: deliberately hostile: the host must reject the out-of-bounds string, not read it.
    unsafe { raw_log(2, ptr as *const u8, 0x7fff_ffff) };
    Ok(json!({ "survived": true, "ptr": ptr }))
}

/// Arguments of `log_flood`.
#[derive(Deserialize, JsonSchema)]
struct Flood {
    /// Number of lines (default 100000).
    #[serde(default)]
    lines: Option<usize>,
    /// Approximate bytes per line (default 96).
    #[serde(default)]
    line_bytes: Option<usize>,
}

fn log_flood(ctx: &Context, i: Flood) -> Result<Value, ToolError> {
    let n = i.lines.unwrap_or(100_000);
    let line = "flood ".repeat(i.line_bytes.unwrap_or(96) / 6);
    for k in 0..n {
        ctx.log(LogLevel::Info, &format!("{k} {line}"));
    }
    Ok(json!({ "sent": n }))
}

fn panic_tool(_: &Context, _: Value) -> Result<Value, ToolError> {
    panic!("hostile panic");
}

/// Arguments of `read_env`.
#[derive(Deserialize, JsonSchema)]
struct EnvInput {
    /// Variable name.
    name: String,
}

fn read_env(_: &Context, i: EnvInput) -> Result<Value, ToolError> {
    let visible: Vec<String> = std::env::vars_os()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    Ok(match std::env::var(&i.name) {
        Ok(v) => json!({ "name": i.name, "value": v, "visible": visible }),
        Err(e) => {
            json!({ "name": i.name, "value": null, "error": e.to_string(), "visible": visible })
        }
    })
}

/// Per-instance state: a fresh instance per call always starts from zero.
static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn counter(_: &Context, _: Value) -> Result<Value, ToolError> {
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    Ok(json!({ "count": n }))
}

fn ok(_: &Context, _: Value) -> Result<Value, ToolError> {
    Ok(json!({ "ok": true }))
}

struct Hostile;

impl Plugin for Hostile {
    fn meta() -> PluginMeta {
        PluginMeta::new(
            "hostile",
            env!("CARGO_PKG_VERSION"),
            "Adversarial plugin for sandbox tests. Never install it.",
        )
    }

    fn tools() -> Vec<Tool> {
        vec![
            Tool::new("ok", "Return {\"ok\": true}.", ok),
            Tool::new("preopens", "List preopened directories.", preopens),
            Tool::new("traverse_read", "Read through a raw `..` path.", traverse_read),
            Tool::new(
                "traverse_create",
                "Create a file through a raw `..` path.",
                traverse_create,
            ),
            Tool::new("absolute_read", "Read an absolute path from a preopen.", absolute_read),
            Tool::new(
                "symlink_escape",
                "Create a symlink pointing outside and use it.",
                symlink_escape,
            ),
            Tool::new(
                "symlink_trailing_slash",
                "Use an escaping symlink with a trailing slash.",
                symlink_trailing_slash,
            ),
            Tool::new(
                "hardlink_escape",
                "Hard-link a file across preopens and write through it.",
                hardlink_escape,
            ),
            Tool::new("rename_escape", "Rename a file across preopens.", rename_escape),
            Tool::new(
                "truncate_readonly",
                "Truncate a file in a read-only preopen.",
                truncate_readonly,
            ),
            Tool::new(
                "write_readonly",
                "Write to a file in a read-only preopen.",
                write_readonly,
            ),
            Tool::new(
                "create_in_readonly",
                "Create entries in a read-only preopen.",
                create_in_readonly,
            ),
            Tool::new(
                "delete_in_readonly",
                "Delete or rename entries in a read-only preopen.",
                delete_in_readonly,
            ),
            Tool::new(
                "http_get",
                "GET a URL with raw wasi:http, following redirects.",
                net::http_get,
            ),
            Tool::new("infinite_loop", "Spin forever.", infinite_loop),
            Tool::new("memory_bomb", "Allocate memory forever.", memory_bomb),
            Tool::new("deep_recursion", "Overflow the stack.", deep_recursion),
            Tool::new("huge_output", "Return a huge JSON string.", huge_output),
            Tool::new("stdout_flood", "Write megabytes to stdout and stderr.", stdout_flood),
            Tool::new(
                "huge_host_arg",
                "Pass an out-of-bounds string to the host's log import.",
                huge_host_arg,
            ),
            Tool::new("log_flood", "Send 100k log lines.", log_flood),
            Tool::new("panic", "Panic.", panic_tool),
            Tool::new(
                "counter",
                "Count calls in a static: always 1 when instances are fresh.",
                counter,
            ),
            Tool::new("read_env", "Read an environment variable.", read_env),
            Tool::new("open_many", "Open one file many times and hold it.", fs::open_many),
            Tool::new("open_path", "Open a path for reading and read it.", fs::open_path),
            Tool::new("list", "List a preopen.", fs::list),
            Tool::new(
                "replace_with_symlink",
                "Swap a directory for a symlink.",
                fs::replace_with_symlink,
            ),
            Tool::new("spin_ms", "Mark an execution, then compute for `ms` ms.", soak::spin_ms),
        ]
    }
}

keel_sdk::export_plugin!(Hostile);
