//! Where CUDA's libraries are: the folders CUDA toolkits, conda and pip's nvidia wheels put
//! them in, and cuBLAS made loadable from there for cudarc, whose loader asks for it by name.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Folders that hold CUDA's libraries: toolkits (`$CUDA_HOME`, `$CUDA_PATH`, /usr/local/cuda*),
/// conda (`$CONDA_PREFIX/lib`), and pip's nvidia wheels in every Python site folder of the
/// active virtual environment, conda, the user and the system (`nvidia/cu13/lib` for CUDA 13,
/// `nvidia/cuda_nvrtc/lib` and `nvidia/cublas/lib` for CUDA 12).
pub fn library_dirs() -> Vec<PathBuf> {
    let env = |name: &str| std::env::var_os(name).map(PathBuf::from);
    let mut toolkits: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| env(v))
        .collect();
    toolkits.push(PathBuf::from("/usr/local/cuda"));
    toolkits.extend(children(Path::new("/usr/local"), "cuda-"));
    let mut dirs: Vec<PathBuf> = toolkits
        .iter()
        .flat_map(|t| [t.join("lib64"), t.join("targets/x86_64-linux/lib")])
        .collect();
    let conda = env("CONDA_PREFIX");
    dirs.extend(conda.iter().map(|c| c.join("lib")));
    let mut prefixes: Vec<PathBuf> = [env("VIRTUAL_ENV"), conda].into_iter().flatten().collect();
    prefixes.extend(env("HOME").map(|h| h.join(".local")));
    prefixes.extend([PathBuf::from("/usr/local"), PathBuf::from("/usr")]);
    let mut sites = vec![PathBuf::from("/usr/lib/python3/dist-packages")];
    for prefix in prefixes {
        for python in children(&prefix.join("lib"), "python3") {
            sites.extend([python.join("site-packages"), python.join("dist-packages")]);
        }
    }
    for site in sites {
        let nvidia = site.join("nvidia");
        dirs.extend(
            ["cu13/lib", "cuda_nvrtc/lib", "cublas/lib"]
                .iter()
                .map(|d| nvidia.join(d)),
        );
    }
    dirs.retain(|d| d.is_dir());
    dirs.dedup();
    dirs
}

/// The subfolders of `dir` whose names start with `prefix`, newest version first (by name).
fn children(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    found.sort();
    found.reverse();
    found
}

/// Makes cuBLAS 12 loadable where only a folder of [`library_dirs`] has it (pip's
/// `nvidia-cublas-cu12`, a toolkit not on `LD_LIBRARY_PATH`): cudarc asks the loader for
/// `libcublas.so.12` by name, and the loader answers that with a library already loaded under
/// that soname, so loading it by path first (globally, for the process's life) is enough.
/// Returns where cuBLAS is, or why it cannot be used.
pub fn preload_cublas() -> &'static Result<String, String> {
    static FOUND: OnceLock<Result<String, String>> = OnceLock::new();
    FOUND.get_or_init(|| {
        const NAME: &str = "libcublas.so.12";
        if load_global(NAME).is_ok() {
            return Ok(NAME.to_string());
        }
        let dirs = library_dirs();
        for dir in &dirs {
            let path = dir.join(NAME);
            if path.is_file() {
                // cuBLAS needs cuBLASLt, which sits beside it.
                let lt = dir.join("libcublasLt.so.12");
                if lt.is_file() {
                    load_global(&lt.display().to_string())?;
                }
                load_global(&path.display().to_string())?;
                return Ok(path.display().to_string());
            }
        }
        let newer = dirs.iter().map(|d| d.join("libcublas.so.13")).find(|p| p.is_file());
        Err(match newer {
            Some(path) => format!(
                "cuBLAS 13 is at `{}`, but this build calls cuBLAS 12 (cudarc's CUDA 12.8 bindings): pip install nvidia-cublas-cu12",
                path.display()
            ),
            None => "cuBLAS (libcublas.so.12) is not installed: pip install nvidia-cublas-cu12, or add a CUDA 12 toolkit's lib64 to LD_LIBRARY_PATH".to_string(),
        })
    })
}

/// Loads a library for the rest of the process, its symbols visible to later loads.
fn load_global(path: &str) -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading cuBLAS runs only its own initialisers.
    let library = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| format!("`{path}`: {e}"))?;
    // Kept loaded: cudarc resolves its functions from it later.
    std::mem::forget(library);
    Ok(())
}
