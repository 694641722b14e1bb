//! The in-kernel relay's maps and program (`bpf/relay.bpf.c`): loading it
//! (with aya, which parses the object, its BTF and relocations, loads and
//! attaches), adopting maps another process made (an upgrade), and the few
//! element operations the daemon makes on them (plain `bpf(2)` calls: each
//! is one fixed-size attribute block, and they must not need `&mut`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// The object built from `bpf/relay.bpf.c` (empty if clang was missing).
pub const OBJECT: &[u8] = &ALIGNED.0;

/// ELF parsing wants the object 8-byte aligned, which `include_bytes!` is not.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);
static ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/relay.bpf.o")));
/// Why [`OBJECT`] is empty; empty when it is not.
pub const MISSING: &str = env!("PORTMUX_BPF_MISSING");
/// Names this layout of the maps (their types, sizes and meaning); an
/// upgrade adopts maps only of the same layout.
pub const LAYOUT: u32 = 1;
/// Entries in each map: two per flow.
pub const SLOTS: u32 = 65536;

/// One direction's counts, written by the program only.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes left on the socket for user space to write to the peer.
    pub passed: u64,
    /// Bytes the kernel sent on to the peer.
    pub redirected: u64,
    /// When the last byte came (CLOCK_MONOTONIC, ns); 0: none yet.
    pub last_ns: u64,
}

/// One direction's controls, written by user space only.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ctl {
    /// Of the passed bytes, how many user space wrote to the peer.
    pub written: u64,
    /// The kernel redirects while `redirected` stays within this.
    pub limit: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Link {
    peer: u64,
    slot: u32,
    pad: u32,
}

/// The relay's maps; the program is attached to `socks` and lives as long as it.
#[derive(Debug)]
pub struct Maps {
    socks: OwnedFd,
    links: OwnedFd,
    stats: OwnedFd,
    ctl: OwnedFd,
    claims: OwnedFd,
}

/// What each map must be (type, key size, value size), in the order of [`Maps::fds`].
const SHAPES: [(u32, u32, u32, &str); 5] = [
    (libc_bpf::MAP_SOCKHASH, 8, 4, "socks"),
    (libc_bpf::MAP_HASH, 8, 16, "links"),
    (libc_bpf::MAP_ARRAY, 4, 24, "stats"),
    (libc_bpf::MAP_ARRAY, 4, 16, "ctl"),
    (libc_bpf::MAP_HASH, 4, 4, "claims"),
];

mod libc_bpf {
    pub const MAP_HASH: u32 = 1;
    pub const MAP_ARRAY: u32 = 2;
    pub const MAP_SOCKHASH: u32 = 18;
    pub const LOOKUP: libc::c_int = 1;
    pub const UPDATE: libc::c_int = 2;
    pub const DELETE: libc::c_int = 3;
    pub const NOEXIST: u64 = 1;
    pub const OBJ_GET_INFO_BY_FD: libc::c_int = 15;
}

/// Loads and attaches the program; the error says why the kernel (or this
/// build) refused, in words for the start-up log.
pub fn load() -> Result<Maps, String> {
    use aya::maps::MapData;
    use aya::programs::SkSkb;
    if OBJECT.is_empty() {
        return Err(MISSING.to_string());
    }
    let mut bpf = aya::EbpfLoader::new()
        .load(OBJECT)
        .map_err(|e| format!("the kernel refused the relay's maps: {}", chain(&e)))?;
    let mut take = |name: &str| -> Result<MapData, String> {
        match bpf.take_map(name) {
            Some(aya::maps::Map::SockHash(m) | aya::maps::Map::HashMap(m) | aya::maps::Map::Array(m)) => Ok(m),
            _ => Err(format!("the BPF object lacks its map {name}")),
        }
    };
    let socks = take("socks")?;
    let links = take("links")?;
    let stats = take("stats")?;
    let ctl = take("ctl")?;
    let claims = take("claims")?;
    let dup = |m: &MapData| m.fd().as_fd().try_clone_to_owned().map_err(|e| format!("cannot keep a map fd: {e}"));
    let maps =
        Maps { socks: dup(&socks)?, links: dup(&links)?, stats: dup(&stats)?, ctl: dup(&ctl)?, claims: dup(&claims)? };
    let socks = aya::maps::SockHash::<MapData, u64>::try_from(aya::maps::Map::SockHash(socks))
        .map_err(|e| format!("the socket map: {}", chain(&e)))?;
    let prog: &mut SkSkb = bpf
        .program_mut("relay")
        .ok_or("the BPF object lacks its program")?
        .try_into()
        .map_err(|e| format!("the relay program: {}", chain(&e)))?;
    prog.load().map_err(|e| format!("the kernel refused the relay program: {}", chain(&e)))?;
    let link = prog.attach(socks.fd()).map_err(|e| format!("cannot attach the relay program: {}", chain(&e)))?;
    // Attached to the map, the program stays with it (and with whichever
    // process holds the map after an upgrade); the link would detach it
    // when dropped.
    let link = prog.take_link(link).map_err(|e| format!("the relay program's attachment: {}", chain(&e)))?;
    std::mem::forget(link);
    maps.check()?;
    Ok(maps)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

impl Maps {
    /// Maps another process made (passed by an upgrade), in the order of [`Maps::fds`].
    pub fn adopt(fds: [OwnedFd; 5]) -> Result<Maps, String> {
        let [socks, links, stats, ctl, claims] = fds;
        let maps = Maps { socks, links, stats, ctl, claims };
        maps.check()?;
        Ok(maps)
    }

    /// The maps' fds, to pass to a new process: socks, links, stats, ctl, claims.
    pub fn fds(&self) -> [BorrowedFd<'_>; 5] {
        [self.socks.as_fd(), self.links.as_fd(), self.stats.as_fd(), self.ctl.as_fd(), self.claims.as_fd()]
    }

    /// Claims the pair of slots starting at `even` for this process; false
    /// if another flow (of any process) holds it.
    pub fn claim(&self, even: u32) -> io::Result<bool> {
        let pid = std::process::id();
        match elem(libc_bpf::UPDATE, self.claims.as_fd(), &even, Some(&pid), libc_bpf::NOEXIST) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives a pair of slots back.
    pub fn release(&self, even: u32) -> io::Result<()> {
        elem::<u32, u32>(libc_bpf::DELETE, self.claims.as_fd(), &even, None, 0)
    }

    /// Refuses maps of another shape than this build's program uses.
    fn check(&self) -> Result<(), String> {
        for (fd, (kind, key, value, name)) in self.fds().into_iter().zip(SHAPES) {
            let info = map_info(fd).map_err(|e| format!("cannot inspect the map {name}: {e}"))?;
            if info != (kind, key, value) {
                return Err(format!("the map {name} is not the one this portmux uses ({info:?})"));
            }
        }
        Ok(())
    }

    /// Puts a connected TCP socket in the map under its cookie.
    pub fn insert_socket(&self, cookie: u64, sock: BorrowedFd<'_>) -> io::Result<()> {
        let fd = sock.as_raw_fd() as u32;
        elem(libc_bpf::UPDATE, self.socks.as_fd(), &cookie, Some(&fd), 0)
    }

    /// Takes a socket out of the map (its own data path is restored).
    pub fn remove_socket(&self, cookie: u64) -> io::Result<()> {
        elem::<u64, u32>(libc_bpf::DELETE, self.socks.as_fd(), &cookie, None, 0)
    }

    /// Says that the socket `cookie` relays to `peer`, counting in `slot`.
    pub fn link(&self, cookie: u64, peer: u64, slot: u32) -> io::Result<()> {
        elem(libc_bpf::UPDATE, self.links.as_fd(), &cookie, Some(&Link { peer, slot, pad: 0 }), 0)
    }

    pub fn unlink(&self, cookie: u64) -> io::Result<()> {
        elem::<u64, Link>(libc_bpf::DELETE, self.links.as_fd(), &cookie, None, 0)
    }

    /// A direction's counts.
    pub fn stats(&self, slot: u32) -> io::Result<Stats> {
        let mut s = Stats::default();
        lookup(self.stats.as_fd(), &slot, &mut s)?;
        Ok(s)
    }

    /// Zeroes a slot's counts before a flow uses it (the program is not
    /// using the slot then: no link names it).
    pub fn reset_stats(&self, slot: u32) -> io::Result<()> {
        elem(libc_bpf::UPDATE, self.stats.as_fd(), &slot, Some(&Stats::default()), 0)
    }

    pub fn set_ctl(&self, slot: u32, ctl: Ctl) -> io::Result<()> {
        elem(libc_bpf::UPDATE, self.ctl.as_fd(), &slot, Some(&ctl), 0)
    }

    pub fn ctl(&self, slot: u32) -> io::Result<Ctl> {
        let mut c = Ctl::default();
        lookup(self.ctl.as_fd(), &slot, &mut c)?;
        Ok(c)
    }
}

/// `bpf(2)`'s attribute block for element operations.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn sys_bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a live, properly laid out attribute block for `cmd`
    // (`ElemAttr` or `InfoAttr`), whose size is passed exactly; the pointers
    // inside it point to live buffers of the sizes the map was checked to use.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, (attr as *mut T).cast::<libc::c_void>(), size_of::<T>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Update (with a value) or delete (without) one element.
fn elem<K, V>(cmd: libc::c_int, map: BorrowedFd<'_>, key: &K, value: Option<&V>, flags: u64) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: (key as *const K) as u64,
        value: value.map_or(0, |v| (v as *const V) as u64),
        flags,
        ..ElemAttr::default()
    };
    sys_bpf(cmd, &mut attr)
}

fn lookup<K, V>(map: BorrowedFd<'_>, key: &K, value: &mut V) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: (key as *const K) as u64,
        value: (value as *mut V) as u64,
        ..ElemAttr::default()
    };
    sys_bpf(libc_bpf::LOOKUP, &mut attr)
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// A map's (type, key size, value size).
fn map_info(map: BorrowedFd<'_>) -> io::Result<(u32, u32, u32)> {
    // struct bpf_map_info begins with type, id, key_size, value_size; the
    // kernel fills what fits and wants the rest zero.
    let mut info = [0u32; 24];
    let mut attr = InfoAttr {
        bpf_fd: map.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    sys_bpf(libc_bpf::OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((info[0], info[2], info[3]))
}
