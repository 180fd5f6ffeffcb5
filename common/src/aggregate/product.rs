//! Base-weight folding for FedEx-LoRA and FLoRA: the weighted mean of the clients' LoRA products
//! `M = Σ pᵢ·Bᵢ·Aᵢ` (`pᵢ = wᵢ / Σ w`) per adapted layer, as a streaming accumulator ([`ProductMean`]), the
//! "product" blob it becomes, and how a model folds that blob into its frozen base weights ([`base_deltas`]).
//!
//! **Representation.** Per layer (`W0 ∈ R^{d×k}`, rank r, c contributing clients) the product travels either
//! as stacked factors — `{module}.product.B` = `[p₁B₁ … p_cB_c]` (`d × c·r`) and `{module}.product.A` =
//! `[A₁; …; A_c]` (`c·r × k`), so `M = product.B · product.A` — or dense as `{module}.product.dense`
//! (`d × k`), whichever holds fewer values: `min(c·r(d+k), d·k)` per layer, as the communication planner counts.
//!
//! **Memory.** The accumulator keeps the factors only while they are smaller than the dense matrix and then
//! switches to a dense f64 sum, so its state is O(min(c·r(d+k), d·k)) per layer, bounded whatever c is.
//!
//! **What a client folds** (scale `s = α/r` of the adapter): FedEx-LoRA `W0 ← W0 + s·(M − B̄·Ā)` with `B̄`, `Ā`
//! the round's global factors (the residual the FedIT mean misses); FLoRA `W0 ← W0 + s·M` (the adapters then
//! restart from their initial values). Either way the global model after the fold is exactly the weighted mean
//! of the clients' models (tested here and in `methods.rs`).
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result, TensorSet};

/// Name suffixes of the product tensors of one module.
pub const PRODUCT_B: &str = "product.B";
/// See [`PRODUCT_B`].
pub const PRODUCT_A: &str = "product.A";
/// See [`PRODUCT_B`].
pub const PRODUCT_DENSE: &str = "product.dense";

/// One adapted layer's accumulated products.
#[derive(Debug)]
enum LayerState {
    /// `(wᵢ, Bᵢ, Aᵢ)` as received (f32), while `count·r(d+k) ≤ d·k`.
    Factors(Vec<(f64, Tensor, Tensor)>),
    /// `Σ wᵢ·Bᵢ·Aᵢ`, row-major `d × k`.
    Dense(Vec<f64>),
}

#[derive(Debug)]
struct Layer {
    module: String,
    d: usize,
    k: usize,
    r: usize,
    state: LayerState,
}

/// The streaming weighted mean of `Bᵢ·Aᵢ` over the clients of a round, for every module with a
/// `{module}.lora_A.weight` (`r × k`) and `{module}.lora_B.weight` (`d × r`) in the round's layout.
#[derive(Debug)]
pub struct ProductMean {
    layers: Vec<Layer>,
    device: Device,
    total_weight: f64,
    count: usize,
}

impl ProductMean {
    /// An empty accumulator for the LoRA layers of `layout` (a set with the shapes of an update).
    pub fn new(layout: &TensorSet) -> Result<Self> {
        let mut layers = Vec::new();
        let mut device = Device::Cpu;
        for (name, a) in layout.iter() {
            let Some(module) = name.strip_suffix(".lora_A.weight") else { continue };
            let b_name = format!("{module}.lora_B.weight");
            let b = layout.get(&b_name).ok_or_else(|| Error::tensor(&b_name, "missing beside its lora_A"))?;
            let ((r, k), (d, r2)) = (a.dims2()?, b.dims2()?);
            if r != r2 {
                return Err(Error::tensor(name, format!("rank {r} but {b_name} has rank {r2}")));
            }
            device = a.device().clone();
            layers.push(Layer { module: module.to_string(), d, k, r, state: LayerState::Factors(Vec::new()) });
        }
        if layers.is_empty() {
            return Err(Error::Config("the trainable set has no LoRA (lora_A/lora_B) layer".into()));
        }
        Ok(Self { layers, device, total_weight: 0.0, count: 0 })
    }

    /// Updates added so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Adds one client's factors with weight `w` (> 0). The update must already have been validated against
    /// the round's layout (names, shapes, finite values): this only reads it.
    pub fn add(&mut self, update: &TensorSet, w: f64) -> Result<()> {
        // Read every factor first, so that an error leaves the state unchanged.
        let mut factors = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let a = update.require(&format!("{}.lora_A.weight", l.module))?.to_dtype(DType::F32)?;
            let b = update.require(&format!("{}.lora_B.weight", l.module))?.to_dtype(DType::F32)?;
            if a.dims() != [l.r, l.k] || b.dims() != [l.d, l.r] {
                return Err(Error::tensor(&l.module, "lora_A/lora_B shapes differ from the round's"));
            }
            factors.push((b, a));
        }
        let n = self.count + 1;
        for (l, (b, a)) in self.layers.iter_mut().zip(factors) {
            let stacked_values = n * l.r * (l.d + l.k);
            let switched = match &mut l.state {
                LayerState::Factors(v) if stacked_values <= l.d * l.k => {
                    v.push((w, b, a));
                    None
                }
                LayerState::Factors(v) => {
                    // The stacked factors would now be larger than the dense matrix: switch to a dense sum.
                    let mut sum = vec![0f64; l.d * l.k];
                    for (wi, bi, ai) in v.iter().chain(std::iter::once(&(w, b, a))) {
                        add_product(&mut sum, *wi, bi, ai)?;
                    }
                    Some(LayerState::Dense(sum))
                }
                LayerState::Dense(sum) => {
                    add_product(sum, w, &b, &a)?;
                    None
                }
            };
            if let Some(s) = switched {
                l.state = s;
            }
        }
        self.count = n;
        self.total_weight += w;
        Ok(())
    }

    /// The product blob's tensors (see the module docs), normalized by the total weight; an error when
    /// nothing was added.
    pub fn finish(&self) -> Result<TensorSet> {
        if self.count == 0 || self.total_weight <= 0.0 {
            return Err(Error::Config("no update was added: there is no product to fold".into()));
        }
        let mut out = TensorSet::new();
        for l in &self.layers {
            match &l.state {
                LayerState::Factors(v) => {
                    let bs: Vec<Tensor> =
                        v.iter().map(|(w, b, _)| b * (w / self.total_weight)).collect::<candle_core::Result<_>>()?;
                    let as_: Vec<Tensor> = v.iter().map(|(_, _, a)| a.clone()).collect();
                    out.insert(format!("{}.{PRODUCT_B}", l.module), Tensor::cat(&bs, 1)?.to_device(&self.device)?);
                    out.insert(format!("{}.{PRODUCT_A}", l.module), Tensor::cat(&as_, 0)?.to_device(&self.device)?);
                }
                LayerState::Dense(sum) => {
                    let m: Vec<f32> = sum.iter().map(|x| (x / self.total_weight) as f32).collect();
                    out.insert(format!("{}.{PRODUCT_DENSE}", l.module), Tensor::from_vec(m, (l.d, l.k), &self.device)?);
                }
            }
        }
        Ok(out)
    }
}

/// `sum += w·B·A` (row-major `d × k`).
fn add_product(sum: &mut [f64], w: f64, b: &Tensor, a: &Tensor) -> Result<()> {
    let p = b.matmul(a)?.flatten_all()?.to_vec1::<f32>()?;
    for (s, x) in sum.iter_mut().zip(p) {
        *s += w * f64::from(x);
    }
    Ok(())
}

/// The modules of a product blob, with their `M` as a dense `d × k` f32 tensor, checking names and shapes.
pub fn product_matrices(product: &TensorSet) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (name, t) in product.iter() {
        if let Some(module) = name.strip_suffix(&format!(".{PRODUCT_DENSE}")) {
            crate::adapter::linear::check_finite(name, t)?;
            t.dims2().map_err(|_| Error::tensor(name, "must be 2-D"))?;
            out.push((module.to_string(), t.to_dtype(DType::F32)?));
        } else if let Some(module) = name.strip_suffix(&format!(".{PRODUCT_B}")) {
            let a_name = format!("{module}.{PRODUCT_A}");
            let a = product.get(&a_name).ok_or_else(|| Error::tensor(&a_name, "missing beside its product.B"))?;
            let ((_, cr), (cr2, _)) = (t.dims2()?, a.dims2()?);
            if cr != cr2 {
                return Err(Error::tensor(name, format!("{cr} columns but {a_name} has {cr2} rows")));
            }
            crate::adapter::linear::check_finite(name, t)?;
            crate::adapter::linear::check_finite(&a_name, a)?;
            out.push((module.to_string(), t.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?));
        } else if !name.ends_with(&format!(".{PRODUCT_A}")) {
            return Err(Error::tensor(name, "not a product tensor (product.B, product.A or product.dense)"));
        }
    }
    if out.is_empty() {
        return Err(Error::Config("the product blob holds no layer".into()));
    }
    Ok(out)
}

/// What each module's frozen base weight gains from one round's product blob: FedEx-LoRA
/// `s·(M − B̄·Ā)` with `B̄`, `Ā` from `round_global` (that round's global factors), FLoRA `s·M`
/// (`round_global = None`). Returns `(module, ΔW0)` pairs, `d × k` f32.
pub fn base_deltas(product: &TensorSet, round_global: Option<&TensorSet>, scale: f64) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (module, m) in product_matrices(product)? {
        let m = match round_global {
            Some(g) => {
                let a = g.require(&format!("{module}.lora_A.weight"))?.to_dtype(DType::F32)?;
                let b = g.require(&format!("{module}.lora_B.weight"))?.to_dtype(DType::F32)?;
                let ba = b.matmul(&a)?;
                if ba.dims() != m.dims() {
                    return Err(Error::tensor(&module, format!("product {:?} but B̄·Ā {:?}", m.dims(), ba.dims())));
                }
                (m - ba)?
            }
            None => m,
        };
        out.push((module, (m * scale)?));
    }
    Ok(out)
}

/// The hash that stands for "the frozen adapter tensors plus every base fold so far": `frozen_sha256` itself
/// when no product was folded (Fed-SB, FedIT, FFA-LoRA), else the sha256 of `frozen_sha256` and the product
/// blobs' sha256 in round order. Clients send it with each update; the coordinator refuses an update trained
/// on other base weights.
pub fn base_chain_sha256(frozen_sha256: &str, products: &[String]) -> String {
    if products.is_empty() {
        return frozen_sha256.to_string();
    }
    let mut s = String::from(frozen_sha256);
    for p in products {
        s.push(':');
        s.push_str(p);
    }
    crate::wire::sha256_hex(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    fn randn(rng: &mut rand::rngs::StdRng, shape: (usize, usize)) -> Tensor {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| StandardNormal.sample(rng)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(x: &Tensor, y: &Tensor) -> f32 {
        (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// Two layers: one where c·r(d+k) stays below d·k (factors), one where it does not (dense).
    fn client(rng: &mut rand::rngs::StdRng) -> TensorSet {
        let mut s = TensorSet::new();
        s.insert("wide.lora_A.weight", randn(rng, (2, 40)));
        s.insert("wide.lora_B.weight", randn(rng, (30, 2)));
        s.insert("narrow.lora_A.weight", randn(rng, (3, 4)));
        s.insert("narrow.lora_B.weight", randn(rng, (5, 3)));
        s
    }

    #[test]
    fn product_is_the_weighted_mean_of_products_in_either_form() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let clients: Vec<TensorSet> = (0..4).map(|_| client(&mut rng)).collect();
        let weights = [1.0, 2.0, 3.0, 4.0];
        let mut pm = ProductMean::new(&clients[0]).unwrap();
        for (c, w) in clients.iter().zip(weights) {
            pm.add(c, w).unwrap();
        }
        let p = pm.finish().unwrap();
        // wide: 4·2·(30+40) = 560 ≤ 1200 → factors; narrow: 2·3·9 = 54 > 20 → dense after the 1st client.
        assert_eq!(p.require("wide.product.B").unwrap().dims(), [30, 8]);
        assert_eq!(p.require("wide.product.A").unwrap().dims(), [8, 40]);
        assert_eq!(p.require("narrow.product.dense").unwrap().dims(), [5, 4]);
        assert_eq!(p.len(), 3);
        for (module, m) in product_matrices(&p).unwrap() {
            let mut want = Tensor::zeros(m.dims(), DType::F32, &Device::Cpu).unwrap();
            for (c, w) in clients.iter().zip(weights) {
                let ba = c
                    .require(&format!("{module}.lora_B.weight"))
                    .unwrap()
                    .matmul(c.require(&format!("{module}.lora_A.weight")).unwrap())
                    .unwrap();
                want = (want + (ba * (w / 10.0)).unwrap()).unwrap();
            }
            assert!(max_abs_diff(&m, &want) < 1e-5, "{module}");
        }
    }

    #[test]
    fn stacked_factors_are_kept_up_to_the_dense_size_as_the_planner_counts() {
        // d = k = 8, r = 2: c·r(d+k) = 32·c against d·k = 64, so 2 clients stay factors (64 = 64), 3 do not.
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mk = |rng: &mut rand::rngs::StdRng| {
            let mut s = TensorSet::new();
            s.insert("m.lora_A.weight", randn(rng, (2, 8)));
            s.insert("m.lora_B.weight", randn(rng, (8, 2)));
            s
        };
        let clients: Vec<TensorSet> = (0..3).map(|_| mk(&mut rng)).collect();
        let mut pm = ProductMean::new(&clients[0]).unwrap();
        pm.add(&clients[0], 1.0).unwrap();
        pm.add(&clients[1], 1.0).unwrap();
        let two = pm.finish().unwrap();
        assert_eq!(two.num_values(), 64);
        assert!(two.get("m.product.B").is_some(), "at equality the factors are kept");
        pm.add(&clients[2], 1.0).unwrap();
        let three = pm.finish().unwrap();
        assert_eq!((three.num_values(), three.get("m.product.dense").is_some()), (64, true));
    }

    #[test]
    fn base_deltas_subtract_the_mean_factors_for_fedex() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let clients: Vec<TensorSet> = (0..3).map(|_| client(&mut rng)).collect();
        let mut pm = ProductMean::new(&clients[0]).unwrap();
        for c in &clients {
            pm.add(c, 1.0).unwrap();
        }
        let p = pm.finish().unwrap();
        let global = client(&mut rng);
        let plain = base_deltas(&p, None, 2.0).unwrap();
        let fedex = base_deltas(&p, Some(&global), 2.0).unwrap();
        for ((m1, d1), (m2, d2)) in plain.iter().zip(&fedex) {
            assert_eq!(m1, m2);
            let ba = global
                .require(&format!("{m1}.lora_B.weight"))
                .unwrap()
                .matmul(global.require(&format!("{m1}.lora_A.weight")).unwrap())
                .unwrap();
            let want = (d1 - (ba * 2.0).unwrap()).unwrap();
            assert!(max_abs_diff(d2, &want) < 1e-4);
        }
    }

    #[test]
    fn bad_input_is_refused_and_changes_nothing() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let c = client(&mut rng);
        let mut pm = ProductMean::new(&c).unwrap();
        let mut missing = c.clone();
        missing.remove("narrow.lora_B.weight");
        assert!(pm.add(&missing, 1.0).is_err());
        assert_eq!(pm.count(), 0);
        assert!(pm.finish().is_err(), "nothing added");
        pm.add(&c, 1.0).unwrap();
        let mut p = pm.finish().unwrap();
        p.insert("x.other", randn(&mut rng, (2, 2)));
        assert!(product_matrices(&p).is_err());
        let mut only_b = TensorSet::new();
        only_b.insert("m.product.B", randn(&mut rng, (2, 2)));
        assert!(product_matrices(&only_b).is_err());
        assert!(ProductMean::new(&TensorSet::new()).is_err());
    }

    #[test]
    fn base_chain_is_the_frozen_hash_until_a_fold() {
        assert_eq!(base_chain_sha256("abc", &[]), "abc");
        let one = base_chain_sha256("abc", &["p1".into()]);
        let two = base_chain_sha256("abc", &["p1".into(), "p2".into()]);
        assert_ne!(one, "abc");
        assert_ne!(one, two);
        assert_eq!(two, base_chain_sha256("abc", &["p1".into(), "p2".into()]));
    }
}
