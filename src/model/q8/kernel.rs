//! Which int8 kernel runs: the fastest the CPU offers, found at run time, unless one is asked
//! for (`--kernel` / `KASMINA_KERNEL`, to compare paths on one machine).

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// An implementation of the Q8_0 matrix multiply, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// AVX-512 VNNI: 16 weight rows per 512-bit multiply-add of 4 int8 pairs (vpdpbusd).
    Avx512Vnni,
    /// AVX-VNNI: the same multiply-add on 256-bit registers, 8 weight rows at once.
    AvxVnni,
    /// AVX2 and FMA: 32-value block dot products with maddubs.
    Avx2,
    /// Plain Rust, on any CPU; the reference the others are tested against.
    Portable,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("unknown kernel {0:?}: expected auto or one of avx512-vnni, avx-vnni, avx2, portable")]
    Unknown(String),
    #[error("kernel {0} is not supported by this CPU (it supports {1})")]
    Unsupported(Kernel, String),
    #[error("the kernel is already chosen: {0}")]
    AlreadyChosen(Kernel),
}

impl Kernel {
    pub const ALL: [Kernel; 4] = [
        Kernel::Avx512Vnni,
        Kernel::AvxVnni,
        Kernel::Avx2,
        Kernel::Portable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Vnni => "avx512-vnni",
            Kernel::AvxVnni => "avx-vnni",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            match self {
                Kernel::Avx512Vnni => {
                    avx2 && std::is_x86_feature_detected!("avx512f")
                        && std::is_x86_feature_detected!("avx512bw")
                        && std::is_x86_feature_detected!("avx512vnni")
                }
                Kernel::AvxVnni => avx2 && std::is_x86_feature_detected!("avxvnni"),
                Kernel::Avx2 => avx2,
                Kernel::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kernel::Portable
        }
    }

    /// Every kernel this CPU runs, fastest first.
    pub fn supported() -> Vec<Kernel> {
        Self::ALL.into_iter().filter(|k| k.is_supported()).collect()
    }

    /// The fastest kernel this CPU runs.
    pub fn detect() -> Kernel {
        Self::ALL
            .into_iter()
            .find(|k| k.is_supported())
            .unwrap_or(Kernel::Portable)
    }

    /// The kernel the process serves with: the one [`Kernel::choose`] set, else the fastest
    /// supported.
    pub fn active() -> Kernel {
        *CHOSEN.get_or_init(Self::detect)
    }

    /// The kernel matrices packed now on this thread are for: [`Kernel::active`], unless
    /// inside [`Kernel::scoped`].
    pub fn packing() -> Kernel {
        SCOPED.get().unwrap_or_else(Self::active)
    }

    /// Runs `f` with matrices packed on this thread for `kernel` (which the CPU must
    /// support): to load the same model for each kernel in one process, as the model tests
    /// do.
    pub fn scoped<R>(kernel: Kernel, f: impl FnOnce() -> R) -> R {
        let previous = SCOPED.replace(Some(kernel));
        struct Restore(Option<Kernel>);
        impl Drop for Restore {
            fn drop(&mut self) {
                SCOPED.set(self.0);
            }
        }
        let _restore = Restore(previous);
        f()
    }

    /// Fixes the kernel for the process before any model loads: `"auto"` (or empty) detects.
    pub fn choose(name: &str) -> Result<Kernel, KernelError> {
        let kernel = match name {
            "auto" | "" => Self::detect(),
            name => {
                let kernel: Kernel = name.parse()?;
                if !kernel.is_supported() {
                    let supported: Vec<_> = Self::supported().iter().map(|k| k.name()).collect();
                    return Err(KernelError::Unsupported(kernel, supported.join(", ")));
                }
                kernel
            }
        };
        match CHOSEN.set(kernel) {
            Ok(()) => Ok(kernel),
            Err(_) if Self::active() == kernel => Ok(kernel),
            Err(_) => Err(KernelError::AlreadyChosen(Self::active())),
        }
    }
}

static CHOSEN: OnceLock<Kernel> = OnceLock::new();

thread_local! {
    static SCOPED: std::cell::Cell<Option<Kernel>> = const { std::cell::Cell::new(None) };
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kernel {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| KernelError::Unknown(s.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fastest_supported_kernel_is_detected_and_names_round_trip() {
        let supported = Kernel::supported();
        assert_eq!(supported.last(), Some(&Kernel::Portable));
        assert_eq!(Kernel::detect(), supported[0]);
        for kernel in Kernel::ALL {
            assert_eq!(kernel.name().parse::<Kernel>().unwrap(), kernel);
        }
        assert_eq!(
            Kernel::scoped(Kernel::Portable, Kernel::packing),
            Kernel::Portable
        );
        assert_eq!(Kernel::packing(), Kernel::active());
        let unknown = "avx1024".parse::<Kernel>().unwrap_err().to_string();
        assert!(
            unknown.contains("avx512-vnni, avx-vnni, avx2, portable"),
            "{unknown}"
        );
        // Every path this CPU offers is named where the tests log, so CI shows what ran.
        eprintln!(
            "kernels on this CPU: {}",
            supported
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
