//! Checkpoints in the released Hugging Face layout: reading (memory-mapped safetensors, single or
//! sharded), and writing deterministic random ones.

pub mod layout;
mod load;
pub mod random;
mod reader;
pub mod writer;

pub use load::scale_name;
pub use reader::{CONFIG_FILE, Checkpoint, INDEX_FILE, SINGLE_FILE, TensorEntry};
pub use writer::{InitDtype, in_memory, write_checkpoint};
