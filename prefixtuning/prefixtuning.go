// Package prefixtuning implements prefix tuning (Li & Liang 2021) as Hugging Face PEFT's
// PREFIX_TUNING does for decoder models: P trainable key/value vectors per attention layer are put
// before the keys and values of every attention layer, and the model runs with every one of its
// own weights frozen.
//
//	K'ₗ = [Kpₗ; Kₗ(x)],  V'ₗ = [Vpₗ; Vₗ(x)]   ([batch, P+s, kvHeads, headDim] in layer l)
//
// Every real token attends to all P prefix positions besides its usual causal and padding-masked
// ones; the prefix positions themselves have no query (they are a cache of past keys and values,
// not tokens), so the outputs keep one position per real token.
//
// # Parameters
//
// The prefix is one matrix [P, L·2·token_dim] whose last axis is ordered (layer, key/value,
// kv head, head_dim): PEFT's get_prompt views it as [batch, P, L·2, heads, head_dim] and permutes
// it to [L·2, batch, heads, P, head_dim], splitting it in (key, value) pairs per layer. token_dim
// is kvHeads·headDim: for grouped-query models PEFT rewrites token_dim = head_dim ·
// num_key_value_heads and num_attention_heads = num_key_value_heads (peft/utils/other.py,
// _prepare_prompt_learning_config; the rewrite gives the same values when a saved config that
// already holds them is read again, so it is never applied twice).
//
// Without PrefixProjection the matrix itself trains (P·L·2·token_dim parameters). With it, the
// prefix is computed by PEFT's PrefixEncoder: an embedding E [P, token_dim] through
// Linear(token_dim, h) → tanh → Linear(h, L·2·token_dim), h = EncoderHiddenSize (default
// token_dim, as PEFT's None becomes token_dim), which trains P·token_dim + token_dim·h + h +
// h·L·2·token_dim + L·2·token_dim parameters.
//
// # Positions
//
// The prefix keys carry no rotary embedding: PEFT hands them to the model as past_key_values,
// which transformers' Llama attention concatenates after rotating only the new keys
// (modeling_llama.py, LlamaAttention.forward: apply_rotary_pos_emb, then past_key_value.update).
// The real tokens are numbered after the prefix: with a cache of P past positions, LlamaModel.forward
// sets cache_position = arange(P, P+s) and position_ids = cache_position (transformers
// src/transformers/models/llama/modeling_llama.py), and PEFT's forward adds num_virtual_tokens to
// any position_ids given (peft_model.py, _adjust_prompt_learning_kwargs) and to the cache
// position in generation (prepare_inputs_for_generation). So token i takes position P+i, P plus
// the sequence length must fit within the model's maximum length, and a sliding window (Mistral)
// counts the prefix positions 0…P−1 like any past positions.
//
// # Storage
//
// The variables live in the scope "/prefix_tuning" (Scope): "prompt_embeddings" [P, L·2·token_dim]
// without projection; with it, "embedding" [P, token_dim] and the two linear layers
// transform/0 and transform/2 (PEFT's transform.0 and transform.2) in GoMLX's [in, out] layout.
// A saved adapter holds the computed prefix only (PEFT's get_prompt_embedding_to_save), so a
// prefix-projection adapter loads for inference as a plain prefix (InferenceMode, what
// NewForInference and ParsePEFTConfig build), as PEFT's PrefixEncoder does in inference mode;
// to continue training the projection, resume from a trainer checkpoint (peft.Trainer's
// SaveCheckpoint keeps every variable).
//
// Prefix tuning does not start at the base model: the prefix positions take a share of every
// attention from the first step.
package prefixtuning

import (
	"fmt"
	"math"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft"
)

// Scope is the absolute GoMLX scope holding the prefix tuning variables.
const Scope = "/prefix_tuning"

// Names of the variables in Scope.
const (
	// PrefixName is the prefix [P, L·2·token_dim] without projection (or in inference mode): the
	// name of the saved tensor in PEFT's file.
	PrefixName = "prompt_embeddings"
	// EmbeddingName is the projection's input embedding [P, token_dim].
	EmbeddingName = "embedding"
)

// Config configures prefix tuning. Start from DefaultConfig: the defaults named below are its
// values.
type Config struct {
	// NumVirtualTokens is P, the number of prefix positions in every attention layer. Default 20:
	// the length of Hugging Face's prefix-tuning examples (PEFT itself has no default) and of
	// prompttuning's default, so the two compare like for like. Must be > 0, and P plus the
	// sequence length must fit in the model's maximum length.
	NumVirtualTokens int `json:"num_virtual_tokens"`
	// PrefixProjection computes the prefix with PEFT's two-layer MLP (Linear → tanh → Linear)
	// from a [P, token_dim] embedding, the reparameterization the paper trains with. Default
	// false, as PEFT.
	PrefixProjection bool `json:"prefix_projection"`
	// EncoderHiddenSize is the MLP's hidden width h with PrefixProjection. Default 0, meaning
	// token_dim, as PEFT fills encoder_hidden_size = token_dim when it is None. An error without
	// PrefixProjection.
	EncoderHiddenSize int `json:"encoder_hidden_size,omitempty"`
	// InferenceMode, with PrefixProjection, holds the computed prefix as a plain [P, L·2·token_dim]
	// variable instead of the embedding and the MLP, as PEFT's PrefixEncoder does in inference
	// mode: what a saved prefix-projection adapter, whose file holds only the computed prefix,
	// loads into. Default false; an error without PrefixProjection.
	InferenceMode bool `json:"inference_mode,omitempty"`
	// ModulesToSave lists modules of the base model trained and saved in full besides the prefix,
	// such as a new classifier head ("score"). Default none.
	ModulesToSave []string `json:"modules_to_save,omitempty"`
	// Seed of the initialization: the prefix (or the projection's embedding) from N(0, 1) as
	// PyTorch's nn.Embedding, the MLP's weights and biases from U(−1/√in, 1/√in) as nn.Linear.
	// Default 0.
	Seed uint64 `json:"seed"`
}

// Limits that refuse absurd configurations before anything is allocated for them.
const (
	maxVirtualTokens  = 8192
	maxEncoderHidden  = 1 << 16
	defaultNumVirtual = 20
)

// DefaultConfig returns 20 prefix positions without projection.
func DefaultConfig() Config {
	return Config{NumVirtualTokens: defaultNumVirtual}
}

// Validate checks the configuration, naming the first field that is wrong. Checks that need the
// model (its maximum length, its attention layers) happen when the method is applied.
func (c Config) Validate() error {
	if c.NumVirtualTokens <= 0 {
		return fmt.Errorf("prefix_tuning: num_virtual_tokens must be > 0, got %d", c.NumVirtualTokens)
	}
	if c.NumVirtualTokens > maxVirtualTokens {
		return fmt.Errorf("prefix_tuning: num_virtual_tokens %d is over the limit of %d (prefixes of tens to hundreds are the norm)", c.NumVirtualTokens, maxVirtualTokens)
	}
	if c.EncoderHiddenSize < 0 || c.EncoderHiddenSize > maxEncoderHidden {
		return fmt.Errorf("prefix_tuning: encoder_hidden_size must be in [0, %d] (0: token_dim), got %d", maxEncoderHidden, c.EncoderHiddenSize)
	}
	if !c.PrefixProjection {
		if c.EncoderHiddenSize != 0 {
			return fmt.Errorf("prefix_tuning: encoder_hidden_size %d given without prefix_projection; it is the projection MLP's width", c.EncoderHiddenSize)
		}
		if c.InferenceMode {
			return fmt.Errorf("prefix_tuning: inference_mode only changes prefix_projection adapters (a plain prefix is the same in both modes); set it only with prefix_projection")
		}
	}
	return nil
}

// PrefixTuning is the prefix-tuning method. It implements peft.Method, peft.InputsHook (it numbers
// the tokens after the prefix and sets Inputs.Past) and peft.AttentionHook (it puts the prefix
// before every attention layer's keys and values).
type PrefixTuning struct {
	cfg Config
	// prefix is the plain prefix [P, L·2·tokenDim], or nil with a (training) projection.
	prefix *context.Variable
	// embedding [P, tokenDim], w1 [tokenDim, h], b1 [h], w2 [h, L·2·tokenDim], b2 [L·2·tokenDim]:
	// the projection, nil without it.
	embedding, w1, b1, w2, b2 *context.Variable
	modules                   []*context.Variable // ModulesToSave's variables

	layers            map[string]int // attention site path → layer index in the prefix
	numLayers         int
	kvHeads, headDim  int
	tokenDim, encoder int // kvHeads·headDim; the MLP's width h
	layout            *peft.Layout
}

// New returns prefix tuning with cfg, or an error naming what is wrong with it.
func New(cfg Config) (*PrefixTuning, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &PrefixTuning{cfg: cfg}, nil
}

// NewForInference is New for a configuration read back from a saved folder: a prefix-projection
// configuration is put in InferenceMode, because the saved file holds the computed prefix, not
// the MLP that computed it. Register it to rebuild methods from this SDK's saved configurations.
func NewForInference(cfg Config) (*PrefixTuning, error) {
	cfg.InferenceMode = cfg.PrefixProjection
	return New(cfg)
}

// Name implements peft.Method.
func (p *PrefixTuning) Name() string { return "prefix_tuning" }

// Config implements peft.Method.
func (p *PrefixTuning) Config() any { return p.cfg }

// projects reports whether the prefix is computed by the MLP (a projection not in inference mode).
func (p *PrefixTuning) projects() bool { return p.cfg.PrefixProjection && !p.cfg.InferenceMode }

// Init implements peft.Method: it checks that the model numbers its inputs through
// peft.EmbedInputs and hands every attention layer's keys and values to
// peft.AttentionKeysValues, all with the same heads, and creates the prefix variables.
func (p *PrefixTuning) Init(ctx *context.Context, layout *peft.Layout) error {
	P := p.cfg.NumVirtualTokens
	if !layout.HasInputs {
		return fmt.Errorf("prefix_tuning: the model does not call peft.EmbedInputs after its token embedding, so its tokens cannot be numbered after the prefix")
	}
	if len(layout.Attentions) == 0 {
		return fmt.Errorf("prefix_tuning: the model does not call peft.AttentionKeysValues in its attention layers, so there is nowhere to put the prefix")
	}
	if err := layout.CheckVirtualTokens(P); err != nil {
		return fmt.Errorf("prefix_tuning: %w", err)
	}
	first := layout.Attentions[0]
	p.layers = map[string]int{}
	for i, site := range layout.Attentions {
		if site.KVHeads != first.KVHeads || site.HeadDim != first.HeadDim {
			return fmt.Errorf("prefix_tuning: attention %s has %d kv heads of width %d, %s has %d of width %d: one prefix matrix needs the same in every layer",
				site.Path, site.KVHeads, site.HeadDim, first.Path, first.KVHeads, first.HeadDim)
		}
		if _, dup := p.layers[site.Path]; dup {
			return fmt.Errorf("prefix_tuning: attention %s hands its keys and values to peft.AttentionKeysValues twice", site.Path)
		}
		p.layers[site.Path] = i
	}
	p.numLayers, p.kvHeads, p.headDim = len(layout.Attentions), first.KVHeads, first.HeadDim
	p.tokenDim = p.kvHeads * p.headDim
	p.encoder = p.tokenDim
	if p.cfg.EncoderHiddenSize > 0 {
		p.encoder = p.cfg.EncoderHiddenSize
	}
	width := p.width()
	if n := float64(P) * float64(width); n > 1<<31 {
		return fmt.Errorf("prefix_tuning: a prefix of %d × %d values is too large", P, width)
	}
	var err error
	if p.modules, err = peft.ModulesToSave(layout, p.cfg.ModulesToSave); err != nil {
		return fmt.Errorf("prefix_tuning: %w", err)
	}
	rng := peft.NewRand(p.cfg.Seed)
	scope := ctx.InAbsPath(Scope)
	if !p.projects() {
		p.prefix = peft.NewVariable(scope, PrefixName, peft.Normal(rng, P*width, 1), P, width)
	} else {
		h, td := p.encoder, p.tokenDim
		p.embedding = peft.NewVariable(scope, EmbeddingName, peft.Normal(rng, P*td, 1), P, td)
		first := scope.In("transform").In("0").In("dense")
		p.w1 = peft.NewVariable(first, "weights", peft.Uniform(rng, td*h, 1/math.Sqrt(float64(td))), td, h)
		p.b1 = peft.NewVariable(first, "biases", peft.Uniform(rng, h, 1/math.Sqrt(float64(td))), h)
		second := scope.In("transform").In("2").In("dense")
		p.w2 = peft.NewVariable(second, "weights", peft.Uniform(rng, h*width, 1/math.Sqrt(float64(h))), h, width)
		p.b2 = peft.NewVariable(second, "biases", peft.Uniform(rng, width, 1/math.Sqrt(float64(h))), width)
	}
	p.layout = layout
	return nil
}

// width is L·2·token_dim, the prefix's last axis.
func (p *PrefixTuning) width() int { return p.numLayers * 2 * p.tokenDim }

// NumVirtualTokens returns P. (peft/generate reads it to leave the prefix room in the model's
// maximum length.)
func (p *PrefixTuning) NumVirtualTokens() int { return p.cfg.NumVirtualTokens }

// SupportsKVCache reports that Inputs honours peft.Inputs.Cached, so peft/generate may decode with
// a key/value cache (its generate.CacheAware): the prefix is never cached (KeysValues puts it
// before the cached keys and values on every call) and the tokens are numbered after it as
// always, continuing from the cached positions.
func (p *PrefixTuning) SupportsKVCache() bool { return true }

// Embedding returns the variable that starts the prefix: the prefix itself [P, L·2·token_dim]
// without projection or in inference mode, the projection's input embedding [P, token_dim]
// otherwise (nil before the method is applied to a model).
func (p *PrefixTuning) Embedding() *context.Variable {
	if p.projects() {
		return p.embedding
	}
	return p.prefix
}

// TokenDim returns token_dim = kvHeads·headDim (0 before the method is applied to a model).
func (p *PrefixTuning) TokenDim() int { return p.tokenDim }

// NumLayers returns the number of attention layers the prefix covers.
func (p *PrefixTuning) NumLayers() int { return p.numLayers }

// Trainable implements peft.Method: the prefix (or the embedding and the MLP) and the modules to
// save.
func (p *PrefixTuning) Trainable(*context.Context) []peft.TrainableVariable {
	var vars []*context.Variable
	if p.projects() {
		vars = []*context.Variable{p.embedding, p.w1, p.b1, p.w2, p.b2}
	} else {
		vars = []*context.Variable{p.prefix}
	}
	return peft.TrainAll(append(vars, p.modules...)...)
}

// State implements peft.Method: what Trainable lists.
func (p *PrefixTuning) State(ctx *context.Context) []*context.Variable {
	return peft.VariablesOf(p.Trainable(ctx))
}

// Inputs implements peft.InputsHook: the tokens keep their embeddings and mask and move up by P
// positions, and Inputs.Past tells the model that every attention layer holds P positions before
// them. A sequence too long to fit with the prefix panics (peft.Model.Call returns it as an error).
func (p *PrefixTuning) Inputs(ctx *context.Context, in *peft.Inputs) *peft.Inputs {
	P := p.cfg.NumVirtualTokens
	seq := in.Embeddings.Shape().Dim(1)
	if in.MaxLength > 0 && P+seq > in.MaxLength {
		panic(fmt.Sprintf("prefix_tuning: num_virtual_tokens %d plus the input length %d is %d, more than the model's maximum length %d",
			P, seq, P+seq, in.MaxLength))
	}
	out := *in
	out.Positions = graph.AddScalar(in.Positions, float64(P))
	out.Past = P
	return &out
}

// Outputs implements peft.InputsHook: the prefix adds no position to the hidden states, so they
// pass unchanged.
func (p *PrefixTuning) Outputs(_ *context.Context, hidden *graph.Node) *graph.Node { return hidden }

// graphParamPrefix is the graph parameter caching the prefix [L·2, P, kvHeads, headDim] of the
// graph being built, so the projection MLP runs once per graph, not once per layer.
const graphParamPrefix = "prefix_tuning_prefix"

// prefixNode returns the prefix of graph g as [L·2, P, kvHeads, headDim]: row 2l holds layer l's
// keys, row 2l+1 its values.
func (p *PrefixTuning) prefixNode(ctx *context.Context, g *graph.Graph) *graph.Node {
	root := ctx.InAbsPath(context.RootScope)
	if cached, ok := root.GetGraphParam(g, graphParamPrefix); ok {
		if node, ok := cached.(*graph.Node); ok {
			return node
		}
	}
	var prefix *graph.Node // [P, L·2·tokenDim]
	if p.projects() {
		hidden := graph.Tanh(graph.Add(graph.Dot(p.embedding.ValueGraph(g), p.w1.ValueGraph(g)), graph.ExpandAxes(p.b1.ValueGraph(g), 0)))
		prefix = graph.Add(graph.Dot(hidden, p.w2.ValueGraph(g)), graph.ExpandAxes(p.b2.ValueGraph(g), 0))
	} else {
		prefix = p.prefix.ValueGraph(g)
	}
	P := p.cfg.NumVirtualTokens
	node := graph.TransposeAllDims(graph.Reshape(prefix, P, 2*p.numLayers, p.kvHeads, p.headDim), 1, 0, 2, 3)
	root.SetGraphParam(g, graphParamPrefix, node)
	return node
}

// KeysValues implements peft.AttentionHook: the layer's P prefix keys and values, the same for
// every sequence of the batch, go before its own.
func (p *PrefixTuning) KeysValues(ctx *context.Context, site *peft.AttentionSite, keys, values *graph.Node) (*graph.Node, *graph.Node) {
	layer, ok := p.layers[site.Path]
	if !ok {
		panic(fmt.Sprintf("prefix_tuning: attention %s was not in the model's layout when the method was applied", site.Path))
	}
	if site.KVHeads != p.kvHeads || site.HeadDim != p.headDim {
		panic(fmt.Sprintf("prefix_tuning: attention %s has %d kv heads of width %d, the prefix was made for %d of width %d",
			site.Path, site.KVHeads, site.HeadDim, p.kvHeads, p.headDim))
	}
	g := keys.Graph()
	prefix := p.prefixNode(ctx, g)
	batch, P := keys.Shape().Dim(0), p.cfg.NumVirtualTokens
	// A Gather of the layer's rows, not a Slice: the pure-Go backend has no gradient for Slice.
	pick := func(row int, own *graph.Node) *graph.Node {
		index := graph.Const(g, tensors.FromFlatDataAndDimensions([]int32{int32(row)}, 1, 1))
		rows := graph.Reshape(graph.Gather(prefix, index, true), 1, P, p.kvHeads, p.headDim)
		if rows.DType() != own.DType() {
			rows = graph.ConvertDType(rows, own.DType())
		}
		rows = graph.BroadcastToDims(rows, batch, P, p.kvHeads, p.headDim)
		return graph.Concatenate([]*graph.Node{rows, own}, 1)
	}
	return pick(2*layer, keys), pick(2*layer+1, values)
}

// PrefixValues returns the prefix [P, L·2·token_dim] row-major, as PEFT saves it: the variable
// itself, or with a projection the MLP's output computed here in float64 and rounded once.
func (p *PrefixTuning) PrefixValues() ([]float32, error) {
	if !p.projects() {
		return peft.Float32s(p.prefix)
	}
	read := func(vars ...*context.Variable) ([][]float32, error) {
		out := make([][]float32, len(vars))
		for i, v := range vars {
			values, err := peft.Float32s(v)
			if err != nil {
				return nil, fmt.Errorf("prefix_tuning: reading %s: %w", v.ScopeAndName(), err)
			}
			out[i] = values
		}
		return out, nil
	}
	vals, err := read(p.embedding, p.w1, p.b1, p.w2, p.b2)
	if err != nil {
		return nil, err
	}
	emb, w1, b1, w2, b2 := vals[0], vals[1], vals[2], vals[3], vals[4]
	P, td, h, width := p.cfg.NumVirtualTokens, p.tokenDim, p.encoder, p.width()
	out := make([]float32, P*width)
	hidden := make([]float64, h)
	row := make([]float64, width)
	for t := range P {
		for j := range h {
			sum := float64(b1[j])
			for i := range td {
				sum += float64(emb[t*td+i]) * float64(w1[i*h+j])
			}
			hidden[j] = math.Tanh(sum)
		}
		for c := range width {
			row[c] = float64(b2[c])
		}
		for j, a := range hidden {
			ws := w2[j*width : (j+1)*width]
			for c, w := range ws {
				row[c] += a * float64(w)
			}
		}
		for c, v := range row {
			out[t*width+c] = float32(v)
		}
	}
	return out, nil
}
