//! NVRTC found and called by mmx itself: CUDA 12's `libnvrtc.so.12` or CUDA 13's `.13`,
//! wherever the loader, a CUDA toolkit, conda or pip's nvidia wheels put it. The calls a
//! compile needs (create, compile, PTX, log, destroy) are the same in both versions, so mmx
//! binds those few itself rather than through cudarc's loader, which knows one major version.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};

use super::cuda_libs::library_dirs;
use std::sync::OnceLock;

use libloading::Library;

/// The major versions mmx looks for, newest first.
const MAJORS: [u32; 2] = [13, 12];

type Program = *mut c_void;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type CreateFn = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileFn = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Program, *mut usize) -> c_int;
type TextFn = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Program) -> c_int;
type ErrorFn = unsafe extern "C" fn(c_int) -> *const c_char;

/// One loaded NVRTC library.
pub struct Nvrtc {
    location: String,
    version: (i32, i32),
    create: CreateFn,
    compile: CompileFn,
    ptx_size: SizeFn,
    ptx: TextFn,
    log_size: SizeFn,
    log: TextFn,
    destroy: DestroyFn,
    error: ErrorFn,
    // The functions above point into it: it lives as long as they do.
    _library: Library,
}

impl std::fmt::Debug for Nvrtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NVRTC {} ({})", self.version(), self.location)
    }
}

impl Nvrtc {
    /// Loads the library at `path` (a file, or a bare name the loader resolves) and binds the
    /// compile calls.
    pub fn open(path: &str) -> Result<Nvrtc, String> {
        // SAFETY: loading NVRTC runs no initialisers beyond the library's own.
        let library = unsafe { Library::new(path) }.map_err(|e| format!("`{path}`: {e}"))?;
        // SAFETY: each symbol is NVRTC's, with the signature of nvrtc.h (the same in 12 and
        // 13); the library stays loaded in `_library`.
        unsafe {
            macro_rules! bind {
                ($name:literal) => {
                    *library
                        .get(concat!($name, "\0").as_bytes())
                        .map_err(|e| format!("`{path}` has no `{}`: {e}", $name))?
                };
            }
            let version: VersionFn = bind!("nvrtcVersion");
            let (mut major, mut minor) = (0, 0);
            if version(&mut major, &mut minor) != 0 {
                return Err(format!("`{path}`: nvrtcVersion failed"));
            }
            Ok(Nvrtc {
                location: path.to_string(),
                version: (major, minor),
                create: bind!("nvrtcCreateProgram"),
                compile: bind!("nvrtcCompileProgram"),
                ptx_size: bind!("nvrtcGetPTXSize"),
                ptx: bind!("nvrtcGetPTX"),
                log_size: bind!("nvrtcGetProgramLogSize"),
                log: bind!("nvrtcGetProgramLog"),
                destroy: bind!("nvrtcDestroyProgram"),
                error: bind!("nvrtcGetErrorString"),
                _library: library,
            })
        }
    }

    /// `major.minor`.
    pub fn version(&self) -> String {
        format!("{}.{}", self.version.0, self.version.1)
    }

    /// The major version.
    pub fn major(&self) -> i32 {
        self.version.0
    }

    /// Where it was loaded from: a path, or the name the loader resolved.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Compiles CUDA C++ `source` (called `name` in messages) to PTX with `options`; a
    /// failure carries NVRTC's log.
    pub fn compile(&self, source: &str, name: &str, options: &[&str]) -> Result<String, String> {
        let text = |s: &str| CString::new(s).map_err(|_| format!("{name}: a NUL in the input"));
        let (source_c, name_c) = (text(source)?, text(name)?);
        let options_c = options
            .iter()
            .map(|o| text(o))
            .collect::<Result<Vec<_>, _>>()?;
        let pointers: Vec<*const c_char> = options_c.iter().map(|o| o.as_ptr()).collect();
        let mut program: Program = std::ptr::null_mut();
        // SAFETY: the strings outlive the calls; `program` is created before it is used and
        // destroyed on every path after.
        unsafe {
            self.check(
                (self.create)(
                    &mut program,
                    source_c.as_ptr(),
                    name_c.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                ),
                name,
            )?;
            let compiled = self.check(
                (self.compile)(program, pointers.len() as c_int, pointers.as_ptr()),
                name,
            );
            let result = match compiled {
                Ok(()) => self.read(program, self.ptx_size, self.ptx, name),
                Err(e) => {
                    let log = self
                        .read(program, self.log_size, self.log, name)
                        .unwrap_or_default();
                    Err(format!("{e}\n{}", log.trim_end()))
                }
            };
            (self.destroy)(&mut program);
            result
        }
    }

    /// Turns an NVRTC status into a result with NVRTC's own words.
    unsafe fn check(&self, status: c_int, name: &str) -> Result<(), String> {
        if status == 0 {
            return Ok(());
        }
        let message = (self.error)(status);
        let message = if message.is_null() {
            format!("error {status}")
        } else {
            CStr::from_ptr(message).to_string_lossy().into_owned()
        };
        Err(format!("{name}: {message}"))
    }

    /// Reads a NUL-terminated text (the PTX or the log) of `program`.
    unsafe fn read(
        &self,
        program: Program,
        size: SizeFn,
        text: TextFn,
        name: &str,
    ) -> Result<String, String> {
        let mut len = 0usize;
        self.check(size(program, &mut len), name)?;
        let mut bytes = vec![0u8; len.max(1)];
        self.check(text(program, bytes.as_mut_ptr().cast()), name)?;
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        bytes.truncate(end);
        String::from_utf8(bytes)
            .map_err(|_| format!("{name}: NVRTC returned text that is not UTF-8"))
    }
}

/// Where NVRTC may be, in the order tried: `MMX_NVRTC` alone when it is set (a library file
/// or the folder holding one), else the loader's own search (`LD_LIBRARY_PATH`, the system's
/// libraries) and then the folders CUDA toolkits, conda and pip's nvidia wheels use.
pub fn candidates() -> Vec<String> {
    if let Some(given) = std::env::var_os("MMX_NVRTC") {
        let given = PathBuf::from(given);
        return if given.is_dir() {
            library_files(&given)
        } else {
            vec![given.display().to_string()]
        };
    }
    let mut out: Vec<String> = MAJORS.iter().map(|m| format!("libnvrtc.so.{m}")).collect();
    for dir in library_dirs() {
        out.extend(library_files(&dir));
    }
    out
}

/// `libnvrtc.so.13` and `.12` in `dir`, where they exist.
fn library_files(dir: &Path) -> Vec<String> {
    MAJORS
        .iter()
        .map(|m| dir.join(format!("libnvrtc.so.{m}")))
        .filter(|p| p.is_file())
        .map(|p| p.display().to_string())
        .collect()
}

/// Every NVRTC that loads, one per version, in the order of [`candidates`]; or why none does.
pub fn every_nvrtc() -> &'static Result<Vec<Nvrtc>, String> {
    static FOUND: OnceLock<Result<Vec<Nvrtc>, String>> = OnceLock::new();
    FOUND.get_or_init(|| {
        let mut found: Vec<Nvrtc> = Vec::new();
        let mut errors = Vec::new();
        for candidate in candidates() {
            match Nvrtc::open(&candidate) {
                Ok(n) if found.iter().all(|f| f.version != n.version) => found.push(n),
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
        }
        if found.is_empty() {
            let tried = if std::env::var_os("MMX_NVRTC").is_some() {
                format!("MMX_NVRTC: {}", errors.join("; "))
            } else {
                "not on the loader's path, nor in a CUDA toolkit, conda or pip's nvidia wheels (pip install nvidia-cuda-nvrtc for CUDA 13, nvidia-cuda-nvrtc-cu12 for 12)".to_string()
            };
            return Err(format!("NVRTC (libnvrtc.so.13 or .12) is not installed: {tried}"));
        }
        Ok(found)
    })
}

/// The NVRTC to compile with for a driver of CUDA major version `driver_major`: the newest
/// whose PTX that driver can load (a driver loads PTX of its own major version or older), or
/// the newest found when the driver is unknown.
pub fn for_driver(driver_major: Option<i32>) -> Result<&'static Nvrtc, String> {
    let found = every_nvrtc().as_ref().map_err(Clone::clone)?;
    let usable = |n: &&Nvrtc| driver_major.is_none_or(|d| n.major() <= d);
    found
        .iter()
        .filter(usable)
        .max_by_key(|n| n.version)
        .ok_or_else(|| {
            format!(
                "NVRTC {} is newer than the CUDA {} driver, which cannot load its PTX: install NVRTC {} (pip install nvidia-cuda-nvrtc-cu{})",
                found.iter().map(Nvrtc::version).collect::<Vec<_>>().join(", "),
                driver_major.unwrap_or_default(),
                driver_major.unwrap_or_default(),
                driver_major.unwrap_or_default(),
            )
        })
}
