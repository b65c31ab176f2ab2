include!("../build/torch_link.rs");
