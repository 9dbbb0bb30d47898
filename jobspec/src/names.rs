//! The enumerations a job file names by string: written and read as their names, and a name
//! that is not one of them is an error listing the allowed ones (`` `tpu` is not one of cpu,
//! cuda ``), which serde's own enum errors would phrase differently.

use serde::de::Visitor;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Reads one of the names of `T`.
struct NameVisitor<T>(std::marker::PhantomData<T>);

/// The learning-rate schedule after warmup (`training.schedule`; `model::optim::Schedule`
/// computes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScheduleKind {
    /// Linear warmup, then linear decay to 0 at `total_steps` (HF's default).
    #[default]
    Linear,
    /// Linear warmup, then half a cosine down to 0.
    Cosine,
    /// Linear warmup, then constant.
    Constant,
    /// Linear warmup, then `peak * sqrt(warmup / step)`: the inverse-square-root decay of
    /// Rothe et al. (and T5).
    Rsqrt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Bf16,
    Fp32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Bleu,
    Rouge,
}

/// Which parts of the model start from BERT and whether encoder and decoder share weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Bert2Bert,
    BertShare,
    Bert2Rnd,
    Rnd2Bert,
    Rnd2Rnd,
}

impl Variant {
    pub fn shares_weights(self) -> bool {
        self == Variant::BertShare
    }
    pub fn encoder_from_bert(self) -> bool {
        matches!(self, Variant::Bert2Bert | Variant::BertShare | Variant::Bert2Rnd)
    }
    pub fn decoder_from_bert(self) -> bool {
        matches!(self, Variant::Bert2Bert | Variant::BertShare | Variant::Rnd2Bert)
    }
}

/// The layouts warm-started from RoBERTa, by Rothe et al.'s names, and the BERT layout each is.
pub const ROBERTA_VARIANTS: [(&str, Variant); 4] = [
    ("roberta2roberta", Variant::Bert2Bert),
    ("robertashare", Variant::BertShare),
    ("roberta2rnd", Variant::Bert2Rnd),
    ("rnd2roberta", Variant::Rnd2Bert),
];

impl Variant {
    /// `--variant` as a name of either family (case-insensitive): the layout, and the
    /// `model_type` the name asks of the pre-trained sides (`None` for rnd2rnd, which takes none).
    pub fn parse_named(s: &str) -> Option<(Variant, Option<&'static str>)> {
        let lower = s.to_ascii_lowercase();
        if let Some(&(_, v)) = ROBERTA_VARIANTS.iter().find(|(n, _)| *n == lower) {
            return Some((v, Some("roberta")));
        }
        let v = Variant::parse(s)?;
        Some((v, (v != Variant::Rnd2Rnd).then_some("bert")))
    }

    /// Every `--variant` name, BERT's then RoBERTa's.
    pub fn all_names() -> Vec<&'static str> {
        Variant::NAMES.iter().copied().chain(ROBERTA_VARIANTS.iter().map(|(n, _)| *n)).collect()
    }
}

/// `parse` and `as_str` over the names, the allowed list for errors, and serde through them.
/// `$fold` maps the text before matching (variants are case-insensitive, as `--variant` is).
macro_rules! names {
    ($t:ident, $fold:expr, { $($v:ident = $s:literal),+ $(,)? }) => {
        impl $t {
            /// Every name, in order, as error messages list them.
            pub const NAMES: &'static [&'static str] = &[$($s),+];
            pub fn parse(s: &str) -> Option<Self> {
                let fold: fn(&str) -> String = $fold;
                match fold(s).as_str() { $($s => Some($t::$v),)+ _ => None }
            }
            pub fn as_str(self) -> &'static str {
                match self { $($t::$v => $s,)+ }
            }
            /// `` `got` is not one of a, b, c ``.
            pub fn not_one_of(got: &str) -> String {
                format!("`{got}` is not one of {}", Self::NAMES.join(", "))
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(NameVisitor(std::marker::PhantomData::<$t>))
            }
        }
        impl Visitor<'_> for NameVisitor<$t> {
            type Value = $t;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            // Inside the deserializer, so that the error names the key.
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<$t, E> {
                $t::parse(s).ok_or_else(|| E::custom($t::not_one_of(s)))
            }
        }
    };
}

names!(ScheduleKind, str::to_owned, { Linear = "linear", Cosine = "cosine", Constant = "constant", Rsqrt = "rsqrt" });
names!(Precision, str::to_owned, { Bf16 = "bf16", Fp32 = "fp32" });
names!(Device, str::to_owned, { Cpu = "cpu", Cuda = "cuda" });
names!(Metric, str::to_owned, { Bleu = "bleu", Rouge = "rouge" });
names!(Variant, str::to_ascii_lowercase, {
    Bert2Bert = "bert2bert",
    BertShare = "bertshare",
    Bert2Rnd = "bert2rnd",
    Rnd2Bert = "rnd2bert",
    Rnd2Rnd = "rnd2rnd",
});
