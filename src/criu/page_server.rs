//! The receiving end of CRIU's page-server protocol (criu/page-xfer.c), spoken in the
//! supervisor: a dump hands CRIU one end of a socket pair (`ps.fd` of the RPC request), and
//! every memory page CRIU dumps comes through here instead of going to a file. So stasis owns
//! the bytes: each `pagemap-*.img` and `pages-*.img` is written by [`crate::store::stored`],
//! compressed, sealed and hashed in the pass that writes it, and nothing is read back.
//!
//! Why the page server and not CRIU's image streaming (`--stream`): streaming would carry
//! every image, but CRIU turns incremental dumps off when it streams (page-xfer.c and
//! pagemap.c: "Image streaming lacks support for incremental images"), while the page-server
//! protocol is how CRIU's own pre-copy migration sends pre-dumps and parent-relative dumps
//! (`PS_IOV_PARENT`, pages flagged `PE_PARENT`). The other images CRIU writes itself are small
//! (kilobytes) and are hashed from the disk.
//!
//! An incremental dump (`track_mem` with a parent) asks, for each pagemap, whether the parent
//! has it (`PS_IOV_OPEN2`'s answer byte, `PS_IOV_PARENT` for a pre-dump): the answer is yes only
//! for the pagemaps of the parent the caller names ([`Pages::parent`]), which are in the store.
//! Only then are runs flagged `PE_PARENT` (no bytes follow) accepted: they go into the pagemap
//! as they are, and a restore finds their pages in the parent (store::chain).
//!
//! Everything CRIU sends is checked: commands, image kinds, run sizes; a run of pages is read
//! under the dump's deadline. An error closes the socket, so CRIU's dump fails and the tree is
//! resumed.

use crate::store::images::{push_entry, PAGE, PE_LAZY, PE_PARENT, PE_PRESENT};
use crate::store::stored::{Stored, StoredWriter, Transform};
use crate::store::StoreError;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

const PS_IOV_ADD: u32 = 1;
const PS_IOV_HOLE: u32 = 2;
const PS_IOV_OPEN: u32 = 3;
const PS_IOV_OPEN2: u32 = 4;
const PS_IOV_PARENT: u32 = 5;
const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_BITS: u32 = 16;
const PS_TYPE_BITS: u32 = 8;
const PS_TYPE_PID: u64 = 1;
const PS_TYPE_SHMEM: u64 = 2;
/// `struct page_server_iov`: u32 cmd, 4 bytes of padding, u64 nr_pages, vaddr, dst_id.
const IOV_SIZE: usize = 32;
/// No single run of pages is larger than a process's address space; this bounds what one
/// message can make stasis wait for.
const MAX_RUN_PAGES: u64 = 1 << 36;
const BUFFER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    #[error("failed to read criu's pages from the page-server socket: {0}")]
    Read(std::io::Error),
    #[error("failed to answer criu on the page-server socket: {0}")]
    Answer(std::io::Error),
    #[error("failed to receive the pages within dump_timeout (criu stopped sending)")]
    TimedOut,
    #[error("failed to receive the pages: criu closed the page-server socket before it said it was done")]
    Closed,
    #[error("failed to receive the pages: criu sent {0}")]
    Protocol(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// What came through: the images written, and how many pages they hold.
#[derive(Debug, Default)]
pub struct Received {
    pub images: Vec<Stored>,
    /// Pages received (written here).
    pub pages: u64,
    /// Pages left in the parent (`PE_PARENT` runs).
    pub parent_pages: u64,
}

/// One message of the protocol.
#[derive(Debug, Clone, Copy)]
struct Iov {
    cmd: u32,
    flags: u32,
    nr_pages: u64,
    vaddr: u64,
    dst_id: u64,
}

impl Iov {
    fn parse(b: &[u8; IOV_SIZE]) -> Iov {
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let cmd = u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
        Iov {
            cmd: cmd & ((1 << PS_CMD_BITS) - 1),
            flags: cmd >> PS_CMD_BITS,
            nr_pages: word(8),
            vaddr: word(16),
            dst_id: word(24),
        }
    }
}

/// Where one dump's pages go, and what its parent holds.
#[derive(Debug, Clone, Default)]
pub struct Pages {
    /// The directory of the images, as the manifest names it (`images`, or `images/pre-dump`
    /// for a pre-copy stop's pre-dump).
    pub rel_dir: String,
    /// The pagemaps (file names, `pagemap-1.img`) of the parent this dump is taken against,
    /// which a run of this dump may leave there; empty for a full dump.
    pub parent: BTreeSet<String>,
}

/// The pagemap being written and its pages file.
struct Open {
    dst_id: u64,
    /// The parent has this pagemap: runs flagged `PE_PARENT` are allowed.
    in_parent: bool,
    pagemap_name: String,
    pagemap: Vec<u8>,
    pages: StoredWriter,
}

/// The socket pair pages come through: stream sockets with large buffers, so CRIU's splices
/// rarely wait for the receiver. Both ends are close-on-exec: criu's is handed over at its start.
pub fn socket_pair() -> std::io::Result<(UnixStream, std::os::fd::OwnedFd)> {
    use nix::sys::socket::{setsockopt, socketpair, sockopt, AddressFamily, SockFlag, SockType};
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
        .map_err(std::io::Error::from)?;
    // Best effort (root may force sizes past the sysctl limits): smaller only means more wake-ups.
    let _ = setsockopt(&ours, sockopt::RcvBufForce, &PAGE_SOCKET_BUFFER);
    let _ = setsockopt(&theirs, sockopt::SndBufForce, &PAGE_SOCKET_BUFFER);
    Ok((ours.into(), theirs))
}

/// Bytes each page-server socket buffers.
const PAGE_SOCKET_BUFFER: usize = 4 << 20;

/// Receives one dump's pages from `sock` into `images` until CRIU says it is done, and
/// answers that only once every image is written, so by CRIU's `post-dump` notification
/// everything is on the disk (to be fsynced by the checkpoint's finalize).
pub fn serve(
    sock: UnixStream,
    images: &Path,
    pages: &Pages,
    t: &Transform<'_>,
    deadline: Instant,
) -> Result<Received, PageServerError> {
    let mut session =
        Session { sock, images, pages, t, deadline, next_pages_id: 1, open: None, done: Received::default() };
    let mut buf = vec![0u8; BUFFER];
    loop {
        let Some(iov) = session.next()? else {
            return Err(PageServerError::Closed);
        };
        match iov.cmd {
            PS_IOV_OPEN | PS_IOV_OPEN2 => {
                session.open(iov.dst_id)?;
                if iov.cmd == PS_IOV_OPEN2 {
                    let in_parent = session.open.as_ref().is_some_and(|o| o.in_parent);
                    session.answer(&[u8::from(in_parent)])?;
                }
            }
            PS_IOV_PARENT => {
                let in_parent = session.pages.parent.contains(&pagemap_name(iov.dst_id)?);
                session.answer(&i32::from(in_parent).to_le_bytes())?
            }
            PS_IOV_ADD | PS_IOV_ADD_F | PS_IOV_HOLE => {
                let flags = match iov.cmd {
                    PS_IOV_ADD_F => iov.flags,
                    PS_IOV_ADD => PE_PRESENT,
                    _ => PE_PARENT,
                };
                session.add(&iov, flags, &mut buf)?;
            }
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                session.close_open()?;
                session.answer(&0i32.to_le_bytes())?;
                return Ok(session.done);
            }
            other => return Err(PageServerError::Protocol(format!("the unknown command {other:#x}"))),
        }
    }
}

struct Session<'a, 'k> {
    sock: UnixStream,
    images: &'a Path,
    pages: &'a Pages,
    t: &'a Transform<'k>,
    deadline: Instant,
    next_pages_id: u32,
    open: Option<Open>,
    done: Received,
}

impl Session<'_, '_> {
    fn left(&self) -> Result<std::time::Duration, PageServerError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(PageServerError::TimedOut);
        }
        Ok(left)
    }

    /// The next message, or None when CRIU closed the socket between messages.
    fn next(&mut self) -> Result<Option<Iov>, PageServerError> {
        let mut b = [0u8; IOV_SIZE];
        let mut got = 0;
        while got < IOV_SIZE {
            match self.read(&mut b[got..])? {
                0 if got == 0 => return Ok(None),
                0 => return Err(PageServerError::Closed),
                n => got += n,
            }
        }
        Ok(Some(Iov::parse(&b)))
    }

    fn read(&mut self, into: &mut [u8]) -> Result<usize, PageServerError> {
        let left = self.left()?;
        self.sock.set_read_timeout(Some(left)).map_err(PageServerError::Read)?;
        loop {
            match self.sock.read(into) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(PageServerError::TimedOut)
                }
                Err(e) => return Err(PageServerError::Read(e)),
            }
        }
    }

    fn answer(&mut self, bytes: &[u8]) -> Result<(), PageServerError> {
        self.sock.set_write_timeout(Some(self.left()?)).map_err(PageServerError::Answer)?;
        self.sock.write_all(bytes).map_err(PageServerError::Answer)
    }

    /// Starts the pagemap CRIU names (a process's or a shared memory object's), with a pages
    /// file of its own, as CRIU's local dump would.
    fn open(&mut self, dst_id: u64) -> Result<(), PageServerError> {
        self.close_open()?;
        let pagemap_name = pagemap_name(dst_id)?;
        let in_parent = self.pages.parent.contains(&pagemap_name);
        let pages_id = self.next_pages_id;
        self.next_pages_id += 1;
        let pagemap = crate::store::images::pagemap_head(pages_id);
        let pages =
            StoredWriter::create_under(self.images, &self.pages.rel_dir, &format!("pages-{pages_id}.img"), self.t)?;
        self.open = Some(Open { dst_id, in_parent, pagemap_name, pagemap, pages });
        Ok(())
    }

    fn add(&mut self, iov: &Iov, flags: u32, buf: &mut [u8]) -> Result<(), PageServerError> {
        if self.open.as_ref().map(|o| o.dst_id) != Some(iov.dst_id) {
            // What CRIU's own page server does for a run that comes without an open.
            self.open(iov.dst_id)?;
        }
        // PE_LAZY only says a lazy restore may fetch the run on demand (CRIU flags private
        // anonymous memory so in every dump); the pages come all the same. A run in the parent
        // (PE_PARENT, never with PE_PRESENT) brings no bytes, and only a pagemap the parent has
        // may have one.
        let in_parent = self.open.as_ref().is_some_and(|o| o.in_parent);
        let parent_run = flags & PE_PARENT != 0;
        if (parent_run && (!in_parent || flags & PE_PRESENT != 0))
            || (!parent_run && flags & PE_PRESENT == 0)
            || flags & !(PE_PRESENT | PE_LAZY | PE_PARENT) != 0
        {
            return Err(PageServerError::Protocol(format!(
                "pages flagged {flags:#x} (pages in a parent dump this dump does not have, or flags it does not know)"
            )));
        }
        if iov.nr_pages == 0 || iov.nr_pages > MAX_RUN_PAGES || iov.vaddr % PAGE != 0 {
            return Err(PageServerError::Protocol(format!("a run of {} pages at {:#x}", iov.nr_pages, iov.vaddr)));
        }
        let entry = crate::store::images::pb::PagemapEntry {
            vaddr: iov.vaddr,
            compat_nr_pages: 0,
            in_parent: None,
            flags: Some(flags),
            nr_pages: Some(iov.nr_pages),
        };
        let open = self.open.as_mut().expect("opened above");
        push_entry(&mut open.pagemap, &entry);
        if parent_run {
            self.done.parent_pages += iov.nr_pages;
            return Ok(());
        }
        let mut left = iov.nr_pages * PAGE;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = self.read(&mut buf[..want])?;
            if n == 0 {
                return Err(PageServerError::Closed);
            }
            self.open.as_mut().expect("opened above").pages.write_all(&buf[..n])?;
            left -= n as u64;
        }
        self.done.pages += iov.nr_pages;
        Ok(())
    }

    fn close_open(&mut self) -> Result<(), PageServerError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        self.done.images.push(open.pages.finish()?);
        let mut pagemap = StoredWriter::create_under(self.images, &self.pages.rel_dir, &open.pagemap_name, self.t)?;
        pagemap.write_all(&open.pagemap)?;
        self.done.images.push(pagemap.finish()?);
        Ok(())
    }
}

/// The pagemap file a `dst_id` names: a process's or a shared memory object's.
fn pagemap_name(dst_id: u64) -> Result<String, PageServerError> {
    let id = dst_id >> PS_TYPE_BITS;
    match dst_id & ((1 << PS_TYPE_BITS) - 1) {
        PS_TYPE_PID => Ok(format!("pagemap-{id}.img")),
        PS_TYPE_SHMEM => Ok(format!("pagemap-shmem-{id}.img")),
        other => Err(PageServerError::Protocol(format!("a pagemap of the unknown kind {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> Vec<u8> {
        let mut b = cmd.to_le_bytes().to_vec();
        b.extend([0u8; 4]);
        b.extend(nr_pages.to_le_bytes());
        b.extend(vaddr.to_le_bytes());
        b.extend(dst_id.to_le_bytes());
        b
    }

    /// Plays CRIU's side of a dump of two processes' pages and one shared memory object.
    #[test]
    fn what_criu_sends_becomes_the_images_a_local_dump_writes() {
        let d = tempfile::tempdir().unwrap();
        let (ours, criu) = UnixStream::pair().unwrap();
        let images = d.path().to_path_buf();
        let server = std::thread::spawn(move || {
            let t = Transform { compression: None, key: None };
            serve(
                ours,
                &images,
                &Pages { rel_dir: "images".into(), ..Default::default() },
                &t,
                Instant::now() + std::time::Duration::from_secs(20),
            )
        });
        let mut criu = criu;
        let page = |b: u8| vec![b; PAGE as usize];
        criu.write_all(&iov(PS_IOV_OPEN2, 0, 0, (1 << 8) | PS_TYPE_PID)).unwrap();
        let mut parent = [9u8; 1];
        criu.read_exact(&mut parent).unwrap();
        assert_eq!(parent, [0], "no parent");
        criu.write_all(&iov(PS_IOV_ADD_F | (PE_PRESENT << 16), 2, 0x1000, (1 << 8) | PS_TYPE_PID)).unwrap();
        criu.write_all(&[page(1), page(2)].concat()).unwrap();
        criu.write_all(&iov(PS_IOV_OPEN2, 0, 0, (7 << 8) | PS_TYPE_SHMEM)).unwrap();
        criu.read_exact(&mut parent).unwrap();
        criu.write_all(&iov(PS_IOV_ADD, 1, 0, (7 << 8) | PS_TYPE_SHMEM)).unwrap();
        criu.write_all(&page(3)).unwrap();
        criu.write_all(&iov(PS_IOV_FORCE_CLOSE, 0, 0, 0)).unwrap();
        let mut status = [1u8; 4];
        criu.read_exact(&mut status).unwrap();
        assert_eq!(i32::from_le_bytes(status), 0);
        let got = server.join().unwrap().unwrap();
        assert_eq!(got.pages, 3);
        let names: Vec<&str> = got.images.iter().map(|f| f.file.path.as_str()).collect();
        assert_eq!(
            names,
            ["images/pages-1.img", "images/pagemap-1.img", "images/pages-2.img", "images/pagemap-shmem-7.img"]
        );
        assert_eq!(std::fs::read(d.path().join("pages-1.img")).unwrap(), [page(1), page(2)].concat());
        // The pagemap reads back as CRIU's (the reader stasis inspect uses).
        let summary = crate::store::images::pagemap_runs(d.path(), "pagemap-1.img").unwrap();
        assert_eq!(summary, (1, vec![(0x1000, 2, PE_PRESENT)]));
    }

    /// An incremental dump: CRIU is told the truth about which pagemaps the parent has, and runs
    /// left in the parent are recorded without bytes, only where the parent has the pagemap.
    #[test]
    fn the_parent_is_claimed_only_for_the_pagemaps_it_has() {
        let d = tempfile::tempdir().unwrap();
        let (ours, mut criu) = UnixStream::pair().unwrap();
        let images = d.path().to_path_buf();
        let server = std::thread::spawn(move || {
            let t = Transform { compression: None, key: None };
            let pages = Pages { rel_dir: "images".into(), parent: ["pagemap-1.img".to_string()].into() };
            serve(ours, &images, &pages, &t, Instant::now() + std::time::Duration::from_secs(20))
        });
        let (one, two) = ((1 << 8) | PS_TYPE_PID, (2 << 8) | PS_TYPE_PID);
        let mut answer = [0u8; 4];
        criu.write_all(&iov(PS_IOV_PARENT, 0, 0, one)).unwrap();
        criu.read_exact(&mut answer).unwrap();
        assert_eq!(i32::from_le_bytes(answer), 1, "the parent has pid 1's pagemap");
        criu.write_all(&iov(PS_IOV_PARENT, 0, 0, two)).unwrap();
        criu.read_exact(&mut answer).unwrap();
        assert_eq!(i32::from_le_bytes(answer), 0, "not pid 2's");
        let mut has = [9u8; 1];
        criu.write_all(&iov(PS_IOV_OPEN2, 0, 0, one)).unwrap();
        criu.read_exact(&mut has).unwrap();
        assert_eq!(has, [1]);
        criu.write_all(&iov(PS_IOV_ADD_F | (PE_PRESENT << 16), 1, 0x1000, one)).unwrap();
        criu.write_all(&[7u8; PAGE as usize]).unwrap();
        criu.write_all(&iov(PS_IOV_ADD_F | (PE_PARENT << 16), 3, 0x2000, one)).unwrap();
        criu.write_all(&iov(PS_IOV_FORCE_CLOSE, 0, 0, 0)).unwrap();
        criu.read_exact(&mut answer).unwrap();
        let got = server.join().unwrap().unwrap();
        assert_eq!((got.pages, got.parent_pages), (1, 3));
        let runs = crate::store::images::pagemap_runs(d.path(), "pagemap-1.img").unwrap();
        assert_eq!(runs, (1, vec![(0x1000, 1, PE_PRESENT), (0x2000, 3, PE_PARENT)]));
        assert_eq!(
            std::fs::read(d.path().join("pages-1.img")).unwrap().len(),
            PAGE as usize,
            "no bytes for the parent's"
        );

        // A run left in a parent that does not have the pagemap is refused.
        let (ours, mut criu) = UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().to_path_buf();
        let server = std::thread::spawn(move || {
            let t = Transform { compression: None, key: None };
            let pages = Pages { rel_dir: "images".into(), parent: ["pagemap-1.img".to_string()].into() };
            serve(ours, &images, &pages, &t, Instant::now() + std::time::Duration::from_secs(20))
        });
        criu.write_all(&iov(PS_IOV_OPEN2, 0, 0, two)).unwrap();
        criu.read_exact(&mut has).unwrap();
        assert_eq!(has, [0], "the parent has no pagemap of pid 2");
        criu.write_all(&iov(PS_IOV_ADD_F | (PE_PARENT << 16), 1, 0x1000, two)).unwrap();
        drop(criu);
        assert!(matches!(server.join().unwrap(), Err(PageServerError::Protocol(_))));
    }

    #[test]
    fn a_dump_that_ends_early_or_lies_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let t = Transform { compression: None, key: None };
        let run = |bytes: Vec<u8>| {
            let (ours, mut criu) = UnixStream::pair().unwrap();
            criu.write_all(&bytes).unwrap();
            drop(criu);
            let dir = tempfile::tempdir_in(d.path()).unwrap();
            serve(
                ours,
                dir.path(),
                &Pages { rel_dir: "images".into(), ..Default::default() },
                &t,
                Instant::now() + std::time::Duration::from_secs(5),
            )
        };
        assert!(matches!(run(Vec::new()), Err(PageServerError::Closed)), "closed before done");
        let open = iov(PS_IOV_OPEN, 0, 0, (1 << 8) | PS_TYPE_PID);
        let short = [open.clone(), iov(PS_IOV_ADD, 2, 0, (1 << 8) | PS_TYPE_PID), vec![0; 4096]].concat();
        assert!(matches!(run(short), Err(PageServerError::Closed)), "half a run");
        let kind = iov(PS_IOV_OPEN, 0, 0, (1 << 8) | 9);
        assert!(matches!(run(kind), Err(PageServerError::Protocol(_))), "unknown kind");
        let parent = [open.clone(), iov(PS_IOV_HOLE, 1, 0, (1 << 8) | PS_TYPE_PID)].concat();
        assert!(matches!(run(parent), Err(PageServerError::Protocol(_))), "a parent run unasked");
        let huge = [open, iov(PS_IOV_ADD, u64::MAX / 4096, 0, (1 << 8) | PS_TYPE_PID)].concat();
        assert!(matches!(run(huge), Err(PageServerError::Protocol(_))), "a run past any address space");
        assert!(matches!(run(iov(0x77, 0, 0, 0)), Err(PageServerError::Protocol(_))), "unknown command");
    }
}
