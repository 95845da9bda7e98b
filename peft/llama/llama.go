// Package llama is the reference model of the SDK: a decoder-only transformer in the Llama style
// (RMSNorm, rotary positions, grouped-query attention, SwiGLU feed-forward, optional tied
// embeddings), written only with peft's building blocks so that every fine-tuning method attaches
// to it unchanged. One decoder runs the Llama, Mistral, Qwen2 and Qwen3 families: Config.Family
// names their few differences (biases, q/k norms, sliding window), and RoPE scaling, head_dim and
// eos lists are read as transformers reads them.
//
// Its layers are named like Hugging Face's LlamaForCausalLM (model.embed_tokens,
// model.layers.N.self_attn.q_proj, …, model.layers.N.mlp.gate_proj, model.norm, lm_head), so
// target patterns written for Hugging Face PEFT select the same layers here, and Hugging Face
// checkpoints map onto it tensor by tensor. Linear weights are stored [in, out] (GoMLX's
// layers.Dense layout), the transpose of PyTorch's.
//
// # Cached decoding
//
// Generation with a key/value cache (peft/generate's default): CausalLMPrefill runs the first ids
// of a sequence and returns the keys and values of every layer with the logits; CausalLMStep runs
// the next ids against that cache and returns it updated. Run them with peft.Model.CallFn so the method is active: their
// logits equal CausalLM's on the whole sequence, for every method whose hooks are per token
// (LoRA, DoRA, QLoRA, AdaLoRA, IA³, adapters) and for prompt and prefix tuning, which honour
// peft.Inputs.Cached.
//
// The cache is two tensors, keys and values, each [layers, batch, length, kvHeads, headDim]
// float32, rotary embedding applied; entry j holds the sequence's position j as the method
// numbers it less Inputs.Past (prompt tuning's k virtual tokens take entries 0…k−1; prefix
// tuning's P positions are never stored, its KeysValues puts them before the cache on every
// call). Rows of different lengths share a batch by left padding: the optional pad input [batch]
// says how many columns of each row are padding; a row's positions start at 0 at its first real
// token, its padding is masked out and written nowhere, so each row's cache is the one it would
// have alone. Padding after the real ids of a prefill is written to the cache and overwritten by
// the steps after it, and no query ever sees an entry after its own position, so it changes
// nothing.
//
// The pure-Go backend has no DynamicUpdateSlice, so new entries are written with a one-hot
// matrix [batch, new, length] of their indices: cache·(1 − written) + oneHotᵀ·new, exact in
// float32 (each entry is either kept or replaced by one product with 1). GoMLX compiles one
// graph per input shape: one for the prefill length and one for the step length.
package llama

import (
	"fmt"
	"math"
	"strconv"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
)

// Config holds the sizes of a model of the Llama family and its relatives (Mistral, Qwen2,
// Qwen3), with Hugging Face config.json's meaning. ModelType selects the family's small
// differences (Family).
type Config struct {
	// ModelType is config.json's model_type: FamilyLlama ("" counts as it), FamilyMistral,
	// FamilyQwen2 or FamilyQwen3.
	ModelType        string  `json:"model_type,omitempty"`
	VocabSize        int     `json:"vocab_size"`
	HiddenSize       int     `json:"hidden_size"`
	IntermediateSize int     `json:"intermediate_size"`
	NumLayers        int     `json:"num_hidden_layers"`
	NumHeads         int     `json:"num_attention_heads"`
	NumKVHeads       int     `json:"num_key_value_heads"`
	MaxPositions     int     `json:"max_position_embeddings"`
	RMSNormEps       float64 `json:"rms_norm_eps"`
	RopeTheta        float64 `json:"rope_theta"`
	TieEmbeddings    bool    `json:"tie_word_embeddings"`
	// HeadDimension is config.json's head_dim, the width of one attention head, where it is not
	// hidden_size/num_attention_heads (Qwen3); 0 means hidden_size/num_attention_heads.
	HeadDimension int `json:"head_dim,omitempty"`
	// AttentionBias puts biases on the attention projections (Llama: q, k, v, o; Qwen3 too),
	// MLPBias on the feed-forward ones (Llama). Qwen2's q, k, v biases come with its family.
	AttentionBias bool `json:"attention_bias,omitempty"`
	MLPBias       bool `json:"mlp_bias,omitempty"`
	// RopeScaling is config.json's rope_scaling (nil: plain RoPE).
	RopeScaling *RopeScaling `json:"rope_scaling,omitempty"`
	// SlidingWindow is Mistral's sliding_window (0: full causal attention).
	SlidingWindow int `json:"sliding_window,omitempty"`
	// BOSTokenID and EOSTokenIDs are the ids that begin and end a sequence (generation stops at
	// any EOS); nil when config.json has none (null). They do not change the model.
	BOSTokenID  *int     `json:"bos_token_id"`
	EOSTokenIDs TokenIDs `json:"eos_token_id"`
}

// Tiny is a small configuration for tests and examples: 2 layers, hidden 32, vocabulary 64.
func Tiny() Config {
	return Config{VocabSize: 64, HiddenSize: 32, IntermediateSize: 64, NumLayers: 2, NumHeads: 4,
		NumKVHeads: 2, MaxPositions: 64, RMSNormEps: 1e-5, RopeTheta: 10000}
}

// HeadDim is the width of one attention head.
func (c Config) HeadDim() int {
	if c.HeadDimension > 0 {
		return c.HeadDimension
	}
	return c.HiddenSize / c.NumHeads
}

// Validate checks that the sizes fit together.
func (c Config) Validate() error {
	for _, f := range []struct {
		name  string
		value int
	}{{"vocab_size", c.VocabSize}, {"hidden_size", c.HiddenSize}, {"intermediate_size", c.IntermediateSize},
		{"num_hidden_layers", c.NumLayers}, {"num_attention_heads", c.NumHeads},
		{"num_key_value_heads", c.NumKVHeads}, {"max_position_embeddings", c.MaxPositions}} {
		if f.value <= 0 {
			return fmt.Errorf("llama config: %s must be > 0, got %d", f.name, f.value)
		}
	}
	// Limits far above any released model, so that a hostile config.json is refused before
	// anything is allocated for it.
	for _, f := range []struct {
		name         string
		value, limit int
	}{{"vocab_size", c.VocabSize, 1 << 22}, {"hidden_size", c.HiddenSize, 1 << 16}, {"intermediate_size", c.IntermediateSize, 1 << 18},
		{"num_hidden_layers", c.NumLayers, 1024}, {"num_attention_heads", c.NumHeads, 1024}, {"num_key_value_heads", c.NumKVHeads, 1024},
		{"head_dim", c.HeadDimension, 1 << 12}, {"max_position_embeddings", c.MaxPositions, 1 << 24}} {
		if f.value > f.limit {
			return fmt.Errorf("llama config: %s %d is over the limit of %d", f.name, f.value, f.limit)
		}
	}
	switch c.ModelType {
	case "", FamilyLlama, FamilyMistral, FamilyQwen2, FamilyQwen3:
	default:
		return fmt.Errorf("llama config: unsupported model_type %q (supported: llama, mistral, qwen2, qwen3)", c.ModelType)
	}
	if c.HeadDimension < 0 || c.SlidingWindow < 0 {
		return fmt.Errorf("llama config: head_dim (%d) and sliding_window (%d) must be ≥ 0", c.HeadDimension, c.SlidingWindow)
	}
	if c.HeadDimension == 0 && c.HiddenSize%c.NumHeads != 0 {
		return fmt.Errorf("llama config: hidden_size %d is not divisible by num_attention_heads %d", c.HiddenSize, c.NumHeads)
	}
	if c.NumHeads%c.NumKVHeads != 0 {
		return fmt.Errorf("llama config: num_attention_heads %d is not divisible by num_key_value_heads %d", c.NumHeads, c.NumKVHeads)
	}
	if c.HeadDim()%2 != 0 {
		return fmt.Errorf("llama config: head dimension %d must be even for rotary embeddings", c.HeadDim())
	}
	if c.RMSNormEps <= 0 || c.RopeTheta <= 0 {
		return fmt.Errorf("llama config: rms_norm_eps (%g) and rope_theta (%g) must be > 0", c.RMSNormEps, c.RopeTheta)
	}
	return nil
}

// Init creates every variable of the model in ctx with deterministic random values from seed
// (normal, standard deviation 0.02, as Hugging Face initializes Llama; norms start at 1).
// numLabels = 0 makes a language model (with an lm_head unless embeddings are tied); numLabels > 0
// a sequence classifier with a "score" head of that many classes. Variables that already exist
// keep their values.
func Init(ctx *context.Context, cfg Config, numLabels int, seed uint64) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if numLabels < 0 {
		return fmt.Errorf("llama.Init: numLabels must be ≥ 0, got %d", numLabels)
	}
	rng := peft.NewRand(seed)
	ctx = ctx.Checked(false)
	normal := func(scope *context.Context, name string, dims ...int) {
		if scope.GetVariableByScopeAndName(scope.Scope(), name) != nil {
			return
		}
		peft.NewVariable(scope, name, peft.Normal(rng, shapes.Make(dtypes.Float32, dims...).Size(), 0.02), dims...)
	}
	ones := func(scope *context.Context, n int) {
		if scope.GetVariableByScopeAndName(scope.Scope(), "weight") != nil {
			return
		}
		values := make([]float32, n)
		for i := range values {
			values[i] = 1
		}
		peft.NewVariable(scope, "weight", values, n)
	}
	d, hd := cfg.HiddenSize, cfg.HeadDim()
	fam := cfg.Family()
	linear := func(scope *context.Context, in, out int, bias bool) {
		normal(scope.In("dense"), "weights", in, out)
		if bias && scope.In("dense").GetVariableByScopeAndName(scope.In("dense").Scope(), "biases") == nil {
			peft.NewVariable(scope.In("dense"), "biases", make([]float32, out), out) // zero, as Hugging Face
		}
	}
	model := ctx.In("model")
	normal(model.In("embed_tokens"), "embeddings", cfg.VocabSize, d)
	for i := range cfg.NumLayers {
		layer := model.In("layers").In(strconv.Itoa(i))
		ones(layer.In("input_layernorm"), d)
		attn := layer.In("self_attn")
		linear(attn.In("q_proj"), d, cfg.NumHeads*hd, fam.QKVBias)
		linear(attn.In("k_proj"), d, cfg.NumKVHeads*hd, fam.QKVBias)
		linear(attn.In("v_proj"), d, cfg.NumKVHeads*hd, fam.QKVBias)
		linear(attn.In("o_proj"), cfg.NumHeads*hd, d, fam.OBias)
		if fam.QKNorm {
			ones(attn.In("q_norm"), hd)
			ones(attn.In("k_norm"), hd)
		}
		ones(layer.In("post_attention_layernorm"), d)
		mlp := layer.In("mlp")
		linear(mlp.In("gate_proj"), d, cfg.IntermediateSize, fam.MLPBias)
		linear(mlp.In("up_proj"), d, cfg.IntermediateSize, fam.MLPBias)
		linear(mlp.In("down_proj"), cfg.IntermediateSize, d, fam.MLPBias)
	}
	ones(model.In("norm"), d)
	switch {
	case numLabels > 0:
		normal(ctx.In("score").In("dense"), "weights", d, numLabels)
	case !cfg.TieEmbeddings:
		normal(ctx.In("lm_head").In("dense"), "weights", d, cfg.VocabSize)
	}
	if peft.BaseModelOf(ctx).Config == nil { // a loaded checkpoint keeps its own record
		data, err := hfConfigJSON(cfg)
		if err != nil {
			return err
		}
		peft.SetBaseModel(ctx, peft.BaseModel{Config: data})
	}
	return nil
}

// CausalLM returns the language model: inputs[0] are token ids [batch, seq] (int32), inputs[1],
// optional, a mask [batch, seq] (non-zero for real tokens). Its one output is the logits
// [batch, seq, vocab].
func CausalLM(cfg Config) peft.ModelFn {
	return func(ctx *context.Context, _ any, inputs []*graph.Node) []*graph.Node {
		peft.SetTask(ctx, inputs[0].Graph(), peft.TaskCausalLM)
		hidden, _ := Decoder(ctx, cfg, inputs)
		return []*graph.Node{lmHead(ctx, cfg, hidden)}
	}
}

// lmHead turns hidden states [batch, seq, hidden] into logits [batch, seq, vocab]: by the tied
// embedding table or lm_head.
func lmHead(ctx *context.Context, cfg Config, hidden *graph.Node) *graph.Node {
	if cfg.TieEmbeddings {
		table := ctx.In("model").In("embed_tokens").GetVariableByScopeAndName(
			ctx.In("model").In("embed_tokens").Scope(), "embeddings")
		return graph.Einsum("bsd,vd->bsv", hidden, table.ValueGraph(hidden.Graph()))
	}
	return peft.OutputHead(ctx.In("lm_head"), hidden, cfg.VocabSize, false)
}

// Classifier returns a sequence classifier: inputs as for CausalLM (right padding); the output
// is the logits [batch, numLabels] read at each sequence's last real token, as Hugging Face's
// LlamaForSequenceClassification does.
func Classifier(cfg Config, numLabels int) peft.ModelFn {
	return func(ctx *context.Context, _ any, inputs []*graph.Node) []*graph.Node {
		peft.SetTask(ctx, inputs[0].Graph(), peft.TaskSeqCls)
		hidden, mask := Decoder(ctx, cfg, inputs)
		seq := hidden.Shape().Dim(1)
		// One-hot of the last real position: a gather without Slice, whose gradient the pure-Go
		// backend lacks.
		last := graph.AddScalar(graph.ReduceSum(graph.ConvertDType(mask, dtypes.Int32), -1), -1)
		pick := graph.OneHot(last, seq, hidden.DType())
		pooled := graph.Einsum("bs,bsd->bd", pick, hidden)
		return []*graph.Node{peft.OutputHead(ctx.In("score"), pooled, numLabels, false)}
	}
}

// Decoder runs the embedding, the transformer blocks and the final norm, returning the hidden
// states [batch, seq, hidden] (one per real input position) and the input mask [batch, seq].
func Decoder(ctx *context.Context, cfg Config, inputs []*graph.Node) (hidden, mask *graph.Node) {
	ids := inputs[0]
	g := ids.Graph()
	batch, seq := idsShape(cfg, ids)
	if len(inputs) > 1 && inputs[1] != nil {
		mask = inputs[1]
		if mask.DType() != dtypes.Bool {
			mask = graph.NotEqual(mask, graph.ZerosLike(mask))
		}
	} else {
		mask = graph.Ones(g, shapes.Make(dtypes.Bool, batch, seq))
	}
	in := embedInputs(ctx, cfg, ids, &peft.Inputs{
		Mask:      mask,
		Positions: graph.Iota(g, shapes.Make(dtypes.Int32, batch, seq), 1),
		MaxLength: cfg.MaxPositions,
	})
	return blocks(ctx, cfg, in, attentionBias(cfg, in.Mask, in.Past), nil), mask
}

// idsShape checks that the token ids are [batch, seq] with seq within the model's positions and
// returns batch and seq.
func idsShape(cfg Config, ids *graph.Node) (batch, seq int) {
	if ids.Rank() != 2 {
		panic(fmt.Sprintf("llama: token ids must be [batch, seq], got %s", ids.Shape()))
	}
	batch, seq = ids.Shape().Dim(0), ids.Shape().Dim(1)
	if seq > cfg.MaxPositions {
		panic(fmt.Sprintf("llama: sequence length %d exceeds max_position_embeddings %d", seq, cfg.MaxPositions))
	}
	return batch, seq
}

// embedInputs embeds ids into in (whose mask, positions and maximum length the caller sets) and
// hands the sequence to the active method (peft.EmbedInputs).
func embedInputs(ctx *context.Context, cfg Config, ids *graph.Node, in *peft.Inputs) *peft.Inputs {
	in.Embeddings = peft.Embedding(ctx.In("model").In("embed_tokens"), ids, cfg.VocabSize, cfg.HiddenSize, dtypes.Float32)
	return peft.EmbedInputs(ctx.In("model"), in)
}

// blocks runs the transformer blocks and the final norm on the embedded inputs, attending with
// the additive bias (attentionBias, cachedBias), and returns the hidden states after the method's
// TrimOutputs. With a cache, each layer's keys and values are written into it and attention runs
// over the cache.
func blocks(ctx *context.Context, cfg Config, in *peft.Inputs, attnBias *graph.Node, cache *kvCache) *graph.Node {
	model := ctx.In("model")
	h := in.Embeddings
	cos, sin := rotary(cfg, in.Positions)
	for i := range cfg.NumLayers {
		layer := model.In("layers").In(strconv.Itoa(i))
		x := rmsNorm(layer.In("input_layernorm"), h, cfg.RMSNormEps)
		h = graph.Add(h, peft.SubBlock(layer.In("self_attn"), peft.Attention, x, func(x *graph.Node) *graph.Node {
			return attention(layer.In("self_attn"), cfg, x, cos, sin, attnBias, cache, i)
		}))
		x = rmsNorm(layer.In("post_attention_layernorm"), h, cfg.RMSNormEps)
		h = graph.Add(h, peft.SubBlock(layer.In("mlp"), peft.FeedForward, x, func(x *graph.Node) *graph.Node {
			return feedForward(layer.In("mlp"), cfg, x)
		}))
	}
	h = rmsNorm(model.In("norm"), h, cfg.RMSNormEps)
	return peft.TrimOutputs(model, h)
}

// rmsNorm is x·w/√(mean(x²)+eps) with the weight "weight" [hidden] in ctx's scope.
func rmsNorm(ctx *context.Context, x *graph.Node, eps float64) *graph.Node {
	w := ctx.Checked(false).WithInitializer(func(g *graph.Graph, shape shapes.Shape) *graph.Node {
		return graph.Ones(g, shape)
	}).VariableWithShape("weight", shapes.Make(x.DType(), x.Shape().Dim(-1)))
	meanSquare := graph.ReduceAndKeep(graph.Square(x), graph.ReduceMean, -1)
	// Div by Sqrt rather than Rsqrt: GoMLX v0.25 has no gradient for Rsqrt.
	normed := graph.Div(x, graph.Sqrt(graph.AddScalar(meanSquare, eps)))
	return graph.Mul(normed, graph.ExpandLeftToRank(w.ValueGraph(x.Graph()), x.Rank()))
}

// rotary returns the cos and sin tables [batch, seq, 1, headDim] for the positions, in Hugging
// Face's rotate_half convention (frequencies repeated over the two halves).
func rotary(cfg Config, positions *graph.Node) (cos, sin *graph.Node) {
	g := positions.Graph()
	hd := cfg.HeadDim()
	freqs := make([]float32, hd)
	for i, f := range cfg.inverseFrequencies(hd) {
		freqs[i], freqs[i+hd/2] = float32(f), float32(f)
	}
	pos := graph.Reshape(graph.ConvertDType(positions, dtypes.Float32), positions.Shape().Dim(0), positions.Shape().Dim(1), 1, 1) // [b, s, 1, 1]
	angles := graph.Mul(pos, graph.Reshape(graph.Const(g, freqs), 1, 1, 1, hd))
	return graph.Cos(angles), graph.Sin(angles)
}

// rotateHalfMatrix is the constant R with x·R = rotate_half(x) = concat(−x[h:], x[:h]). A matmul
// by a constant avoids slicing, whose gradient the pure-Go backend lacks.
func rotateHalfMatrix(g *graph.Graph, hd int) *graph.Node {
	r := make([]float32, hd*hd)
	h := hd / 2
	for j := range h {
		r[(j+h)*hd+j] = -1
		r[j*hd+j+h] = 1
	}
	return graph.Const(g, tensors.FromFlatDataAndDimensions(r, hd, hd))
}

func applyRotary(x, cos, sin *graph.Node) *graph.Node {
	hd := x.Shape().Dim(-1)
	rotated := peft.MatMulLast(x, rotateHalfMatrix(x.Graph(), hd))
	return graph.Add(graph.Mul(x, cos), graph.Mul(rotated, sin))
}

// attentionMask combines the causal mask (within the sliding window when window > 0: query i sees
// keys j with i − window < j ≤ i, as transformers masks it) with the key padding mask:
// [batch, 1, 1, seq, past+seq]. The past key positions (a method's, Inputs.Past) come first and
// are never padding: query i is at position past+i and key j at j, as transformers numbers a
// cache of past positions (cache_position), so the causal mask lets every query see them and a
// sliding window, counted in those positions, drops them only when they fall out of it.
func attentionMask(mask *graph.Node, window, past int) *graph.Node {
	g := mask.Graph()
	batch, seq := mask.Shape().Dim(0), mask.Shape().Dim(1)
	total := past + seq
	rows := graph.Iota(g, shapes.Make(dtypes.Int32, seq, total), 0)
	if past > 0 {
		rows = graph.AddScalar(rows, float64(past))
		mask = graph.Concatenate([]*graph.Node{graph.Ones(g, shapes.Make(mask.DType(), batch, past)), mask}, 1)
	}
	cols := graph.Iota(g, shapes.Make(dtypes.Int32, seq, total), 1)
	allowed := graph.GreaterOrEqual(rows, cols)
	if window > 0 {
		allowed = graph.LogicalAnd(allowed, graph.GreaterThan(cols, graph.AddScalar(rows, float64(-window))))
	}
	causal := graph.BroadcastToDims(graph.Reshape(allowed, 1, 1, 1, seq, total), batch, 1, 1, seq, total)
	keys := graph.BroadcastToDims(graph.Reshape(mask, batch, 1, 1, 1, total), batch, 1, 1, seq, total)
	return graph.LogicalAnd(causal, keys)
}

// attentionBias is the additive attention mask, 0 where a query may see a key and −1e9
// elsewhere, at the full scores shape [batch, kvHeads, group, seq, past+seq] (past: a method's
// key/value positions before the sequence, Inputs.Past). It is built once for all layers, so each
// layer masks with one same-shape Add (whose gradient passes straight through) rather than
// broadcasts and a Where.
func attentionBias(cfg Config, mask *graph.Node, past int) *graph.Node {
	allowed := attentionMask(mask, cfg.Family().SlidingWindow, past) // [batch, 1, 1, seq, past+seq]
	zeros := graph.ZerosLike(graph.ConvertDType(allowed, dtypes.Float32))
	blocked := graph.AddScalar(zeros, -1e9)
	bias := graph.Where(allowed, zeros, blocked)
	batch, seq := mask.Shape().Dim(0), mask.Shape().Dim(1)
	group := cfg.NumHeads / cfg.NumKVHeads
	return graph.BroadcastToDims(bias, batch, cfg.NumKVHeads, group, seq, past+seq)
}

// attention is grouped-query attention in a heads-major layout: queries are scaled and moved to
// [batch, kvHeads, group, seq, headDim] before the products, so that the scores come out of the
// matrix product in the order the softmax and the bias use, and only the small per-head tensors
// are ever transposed, never the [batch, heads, seq, seq] scores. With a cache (not nil), the
// layer's new keys and values are written into its entries and the queries attend over them all.
func attention(ctx *context.Context, cfg Config, x, cos, sin, bias *graph.Node, cache *kvCache, layer int) *graph.Node {
	batch, seq := x.Shape().Dim(0), x.Shape().Dim(1)
	hd, kvHeads := cfg.HeadDim(), cfg.NumKVHeads
	group := cfg.NumHeads / kvHeads
	fam := cfg.Family()
	q := graph.Reshape(peft.Linear(ctx.In("q_proj"), x, cfg.NumHeads*hd, fam.QKVBias), batch, seq, cfg.NumHeads, hd)
	k := graph.Reshape(peft.Linear(ctx.In("k_proj"), x, kvHeads*hd, fam.QKVBias), batch, seq, kvHeads, hd)
	v := graph.Reshape(peft.Linear(ctx.In("v_proj"), x, kvHeads*hd, fam.QKVBias), batch, seq, kvHeads, hd)
	if fam.QKNorm { // Qwen3: an RMSNorm over each head, before the rotary embedding
		q = rmsNorm(ctx.In("q_norm"), q, cfg.RMSNormEps)
		k = rmsNorm(ctx.In("k_norm"), k, cfg.RMSNormEps)
	}
	q = graph.MulScalar(applyRotary(q, cos, sin), 1/math.Sqrt(float64(hd)))
	k = applyRotary(k, cos, sin)
	if cache != nil {
		k, v = cache.update(layer, k, v)
	}
	// A method may put key/value positions of its own before the sequence (prefix tuning); the
	// bias covers them.
	k, v = peft.AttentionKeysValues(ctx, k, v)
	// Query head h uses kv head h / group.
	q = graph.TransposeAllDims(graph.Reshape(q, batch, seq, kvHeads, group, hd), 0, 2, 3, 1, 4) // [b, k, g, q, d]
	scores := graph.Add(graph.Einsum("bkgqd,bskd->bkgqs", q, k), bias)
	probs := graph.Softmax(scores, -1)
	out := graph.Einsum("bkgqs,bskd->bkgqd", probs, v)
	out = graph.Reshape(graph.TransposeAllDims(out, 0, 3, 1, 2, 4), batch, seq, cfg.NumHeads*hd)
	return peft.Linear(ctx.In("o_proj"), out, cfg.HiddenSize, fam.OBias)
}

func feedForward(ctx *context.Context, cfg Config, x *graph.Node) *graph.Node {
	bias := cfg.Family().MLPBias
	gate := peft.Linear(ctx.In("gate_proj"), x, cfg.IntermediateSize, bias)
	up := peft.Linear(ctx.In("up_proj"), x, cfg.IntermediateSize, bias)
	silu := graph.Mul(gate, graph.Sigmoid(gate))
	return peft.Linear(ctx.In("down_proj"), graph.Mul(silu, up), cfg.HiddenSize, bias)
}
