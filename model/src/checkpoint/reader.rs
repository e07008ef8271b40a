//! Opens a checkpoint folder in the Hugging Face layout: `config.json` plus `model.safetensors`,
//! or shards listed by `model.safetensors.index.json`. Files are memory-mapped; tensors are
//! handed out as views into the mapping, never copied (except small fp32 parameters).

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::kernels::Bytes;

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A file's bytes: a memory map, or a buffer for generated checkpoints.
type FileBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    file: usize,
    range: Range<usize>,
}

/// A checkpoint's tensors, memory-mapped (or in memory, for generated models).
pub struct Checkpoint {
    config: ModelConfig,
    /// Shown in errors: the folder, or `"<memory>"`.
    origin: String,
    files: Vec<(String, FileBytes)>,
    tensors: BTreeMap<String, TensorEntry>,
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Io(format!("{}: {e}", path.display()))
}

impl Checkpoint {
    /// Opens `dir`: reads and validates `config.json`, maps the safetensors files and indexes
    /// their tensors. A truncated or malformed file is an error naming the file.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
        let index_path = dir.join(INDEX_FILE);
        let file_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| io_err(&index_path, e))?;
            let index: IndexFile = serde_json::from_str(&text)
                .map_err(|e| ModelError::Checkpoint(format!("{}: {e}", index_path.display())))?;
            let mut names: Vec<String> = index.weight_map.values().cloned().collect();
            names.sort();
            names.dedup();
            names
        } else if dir.join(SINGLE_FILE).exists() {
            vec![SINGLE_FILE.to_string()]
        } else {
            return Err(ModelError::Checkpoint(format!(
                "{}: neither {SINGLE_FILE} nor {INDEX_FILE} found",
                dir.display()
            )));
        };
        let mut files = Vec::new();
        for name in file_names {
            let path: PathBuf = dir.join(&name);
            let file = std::fs::File::open(&path).map_err(|e| io_err(&path, e))?;
            // SAFETY: the mapping is read-only; a checkpoint modified while served is outside the
            // contract (as for every serving engine that maps weights).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err(&path, e))?;
            files.push((path.display().to_string(), Arc::new(map) as FileBytes));
        }
        Self::index(config, dir.display().to_string(), files)
    }

    /// A checkpoint held in memory: `files` are serialized safetensors buffers.
    pub fn from_buffers(config: ModelConfig, files: Vec<Vec<u8>>) -> Result<Self, ModelError> {
        config.validate()?;
        let files =
            files.into_iter().enumerate().map(|(i, b)| (format!("<memory #{i}>"), Arc::new(b) as FileBytes)).collect();
        Self::index(config, "<memory>".into(), files)
    }

    fn index(config: ModelConfig, origin: String, files: Vec<(String, FileBytes)>) -> Result<Self, ModelError> {
        let mut tensors = BTreeMap::new();
        for (fi, (fname, buf)) in files.iter().enumerate() {
            let bytes = (**buf).as_ref();
            let st = SafeTensors::deserialize(bytes)
                .map_err(|e| ModelError::Checkpoint(format!("{fname}: not a valid safetensors file ({e})")))?;
            let base = bytes.as_ptr() as usize;
            for (name, view) in st.iter() {
                let start = view.data().as_ptr() as usize - base;
                let entry = TensorEntry {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    file: fi,
                    range: start..start + view.data().len(),
                };
                if tensors.insert(name.to_string(), entry).is_some() {
                    return Err(ModelError::Checkpoint(format!("tensor {name} appears in more than one file")));
                }
            }
        }
        Ok(Checkpoint { config, origin, files, tensors })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// The entry of a tensor that must exist.
    pub fn require(&self, name: &str) -> Result<&TensorEntry, ModelError> {
        self.tensors.get(name).ok_or_else(|| ModelError::Checkpoint(format!("missing tensor {name}")))
    }

    /// The raw bytes of a tensor, as a view sharing the file mapping.
    pub fn bytes(&self, entry: &TensorEntry) -> Bytes {
        Bytes::new(self.files[entry.file].1.clone(), entry.range.clone())
    }

    /// Total bytes of all tensors (what the files hold).
    pub fn total_tensor_bytes(&self) -> usize {
        self.tensors.values().map(|e| e.range.len()).sum()
    }

    /// Bytes per dtype, for reports.
    pub fn bytes_by_dtype(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for e in self.tensors.values() {
            *out.entry(format!("{:?}", e.dtype)).or_insert(0) += e.range.len();
        }
        out
    }
}
