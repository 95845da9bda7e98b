// Package prompttuning implements prompt tuning (Lester et al. 2021): k trainable "virtual token"
// embeddings P [k, d] are prepended to every input sequence after the model's token embedding,
//
//	E' = [P; E(x)]   ([batch, k+s, d]),   mask' = [1…1; mask],   positions' = [0…k−1; positions+k]
//
// and the model runs on the longer sequence with every one of its own weights frozen. Only P
// trains (k·d parameters), plus any modules named in ModulesToSave, such as a new classifier head.
// After the last layer the k virtual positions are dropped again, so heads see exactly one hidden
// state per real token: a language model's logits keep their shape [batch, s, vocab], and a
// classifier still reads the hidden state of the last real token.
//
// Positions: the virtual tokens take positions 0…k−1 and the real tokens move up by k, which is
// what Hugging Face PEFT does for decoder models (it drops any position ids given and lets the
// model number the whole concatenated sequence). So k plus the sequence length must fit within
// the model's maximum length.
//
// The trimming after the last layer uses a Gather of the real rows rather than a Slice, because
// GoMLX v0.25's pure-Go backend has no gradient for Slice; the gradient flows through the Gather
// and the attention into P.
//
// With a key/value cache (peft/generate's default on the Llama family), the virtual tokens enter
// the cache once, on the first call (llama.CausalLMPrefill); the decoding steps after it
// (peft.Inputs.Cached) prepend nothing and trim nothing, and only number their tokens after the k
// virtual positions.
//
// Storage: P is the float32 variable "prompt_embeddings" [k, d] in the scope "/prompt_tuning"
// (Scope, VariableName): the same name and layout as Hugging Face PEFT's saved prompt_embeddings.
//
// Unlike LoRA or adapters, prompt tuning does not start at the base model: the virtual tokens
// change the outputs from the first step (they are attended to like any other token).
package prompttuning

import (
	"fmt"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
)

// Init names for Config.Init.
const (
	// InitRandom draws P uniformly from [−0.5, 0.5], the paper's random initialization. (Hugging
	// Face's RANDOM leaves PyTorch's nn.Embedding default, N(0, 1), instead.)
	InitRandom = "random"
	// InitVocab copies k rows of the token-embedding table. The paper samples from the 5,000 most
	// frequent tokens; a model here carries no token frequencies, so the rows are drawn uniformly
	// from the first min(5000, vocab) rows (tokenizers usually number frequent tokens first),
	// without repetition while k allows.
	InitVocab = "vocab"
	// InitText copies the embeddings of the tokens InitTokenIDs (a tokenized text such as "Classify
	// the sentiment of this review:"), cut or repeated to length k, as Hugging Face's TEXT init does.
	InitText = "text"
)

// vocabSampleRows is how many leading rows of the embedding table InitVocab samples from: the
// paper's "5,000 most frequent tokens".
const vocabSampleRows = 5000

// Scope is the absolute GoMLX scope holding the prompt embeddings.
const Scope = "/prompt_tuning"

// VariableName is the name of the prompt-embedding variable [k, d] in Scope, as Hugging Face PEFT
// names the saved tensor.
const VariableName = "prompt_embeddings"

// Config configures prompt tuning. Start from DefaultConfig: the defaults named below are its
// values.
type Config struct {
	// NumVirtualTokens is k, the number of virtual tokens prepended to every sequence. Default 20:
	// the paper finds gains level off beyond 20 tokens, and our PyTorch peer benchmark
	// (--prompt-tokens) uses 20, so the two compare like for like. (Hugging Face PEFT has no
	// default; its documentation examples use 8 or 20.) Must be > 0, and k plus the sequence
	// length must fit in the model's maximum length.
	NumVirtualTokens int `json:"num_virtual_tokens"`
	// Init is how P starts: InitRandom (default), InitVocab or InitText.
	Init string `json:"prompt_tuning_init"`
	// InitTokenIDs are the token ids whose embeddings start P with InitText, cut or repeated to
	// length k. Required for InitText and an error with any other init.
	InitTokenIDs []int `json:"init_token_ids,omitempty"`
	// ModulesToSave lists modules of the base model trained and saved in full besides the prompt,
	// such as a new classifier head ("score"). Default none.
	ModulesToSave []string `json:"modules_to_save,omitempty"`
	// Seed of the random and vocabulary initializations. Default 0.
	Seed uint64 `json:"seed"`
}

// maxVirtualTokens bounds num_virtual_tokens, so that a config cannot make Init allocate
// gigabytes before anything checks it.
const maxVirtualTokens = 8192

// DefaultConfig returns 20 virtual tokens with the paper's random uniform initialization.
func DefaultConfig() Config {
	return Config{NumVirtualTokens: 20, Init: InitRandom}
}

// Validate checks the configuration, naming the first field that is wrong. Checks that need the
// model (its maximum length, its vocabulary) happen when the method is applied.
func (c Config) Validate() error {
	if c.NumVirtualTokens <= 0 {
		return fmt.Errorf("prompt_tuning: num_virtual_tokens must be > 0, got %d", c.NumVirtualTokens)
	}
	if c.NumVirtualTokens > maxVirtualTokens {
		return fmt.Errorf("prompt_tuning: num_virtual_tokens %d is over the limit of %d (prompts of tens to hundreds are the norm)", c.NumVirtualTokens, maxVirtualTokens)
	}
	switch c.Init {
	case InitRandom, InitVocab:
		if len(c.InitTokenIDs) > 0 {
			return fmt.Errorf("prompt_tuning: init_token_ids %v given with prompt_tuning_init %q; they are only used with %q",
				c.InitTokenIDs, c.Init, InitText)
		}
	case InitText:
		if len(c.InitTokenIDs) == 0 {
			return fmt.Errorf("prompt_tuning: prompt_tuning_init %q needs init_token_ids", InitText)
		}
		for _, id := range c.InitTokenIDs {
			if id < 0 {
				return fmt.Errorf("prompt_tuning: init_token_ids: token id %d is negative", id)
			}
		}
	default:
		return fmt.Errorf("prompt_tuning: unknown prompt_tuning_init %q (want %q, %q or %q)", c.Init, InitRandom, InitVocab, InitText)
	}
	return nil
}

// PromptTuning is the prompt-tuning method. It implements peft.Method and peft.InputsHook.
type PromptTuning struct {
	cfg       Config
	prompt    *context.Variable   // [k, d]
	modules   []*context.Variable // ModulesToSave's variables
	numLayers int                 // the model's transformer blocks, for PEFT's num_layers
	layout    *peft.Layout        // the model's, from Init
}

// New returns prompt tuning with cfg, or an error naming what is wrong with it.
func New(cfg Config) (*PromptTuning, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &PromptTuning{cfg: cfg}, nil
}

// Name implements peft.Method.
func (p *PromptTuning) Name() string { return "prompt_tuning" }

// Config implements peft.Method.
func (p *PromptTuning) Config() any { return p.cfg }

// Init implements peft.Method: it checks that the model takes prompts and has room for k more
// positions, and creates the prompt embeddings.
func (p *PromptTuning) Init(ctx *context.Context, layout *peft.Layout) error {
	k := p.cfg.NumVirtualTokens
	if !layout.HasInputs {
		return fmt.Errorf("prompt_tuning: the model does not call peft.EmbedInputs after its token embedding, so there is nowhere to put virtual tokens")
	}
	if err := layout.CheckVirtualTokens(k); err != nil {
		return fmt.Errorf("prompt_tuning: %w", err)
	}
	dim := layout.InputDim
	values, err := p.initialValues(ctx, layout, dim)
	if err != nil {
		return err
	}
	if p.modules, err = peft.ModulesToSave(layout, p.cfg.ModulesToSave); err != nil {
		return fmt.Errorf("prompt_tuning: %w", err)
	}
	p.prompt = peft.NewVariable(ctx.InAbsPath(Scope), VariableName, values, k, dim)
	p.numLayers, p.layout = layout.NumLayers, layout
	return nil
}

// initialValues returns P's starting values, [k, dim] row-major.
func (p *PromptTuning) initialValues(ctx *context.Context, layout *peft.Layout, dim int) ([]float32, error) {
	k := p.cfg.NumVirtualTokens
	rng := peft.NewRand(p.cfg.Seed)
	if p.cfg.Init == InitRandom {
		return peft.Uniform(rng, k*dim, 0.5), nil
	}
	if len(layout.Embeddings) == 0 {
		return nil, fmt.Errorf("prompt_tuning: prompt_tuning_init %q copies token embeddings, but the model has no embedding table (peft.Embedding)", p.cfg.Init)
	}
	site := layout.Embeddings[0]
	if site.Dim != dim {
		return nil, fmt.Errorf("prompt_tuning: the embedding table %s is %d wide but the model's inputs are %d wide", site.Path, site.Dim, dim)
	}
	table := site.Table(ctx)
	if table == nil {
		return nil, fmt.Errorf("prompt_tuning: the embedding table %s has no variable", site.Path)
	}
	var ids []int
	switch p.cfg.Init {
	case InitVocab:
		rows := min(vocabSampleRows, site.Vocab)
		perm := rng.Perm(rows)
		ids = make([]int, k)
		for i := range ids {
			if i > 0 && i%rows == 0 {
				perm = rng.Perm(rows) // k > rows: start another pass
			}
			ids[i] = perm[i%rows]
		}
	case InitText:
		for _, id := range p.cfg.InitTokenIDs {
			if id >= site.Vocab {
				return nil, fmt.Errorf("prompt_tuning: init_token_ids: token id %d is outside the vocabulary of %s (size %d)", id, site.Path, site.Vocab)
			}
		}
		ids = TextTokenIDs(p.cfg.InitTokenIDs, k)
	}
	data, err := peft.Float32s(table)
	if err != nil {
		return nil, fmt.Errorf("prompt_tuning: %w", err)
	}
	values := make([]float32, 0, k*dim)
	for _, id := range ids {
		values = append(values, data[id*dim:(id+1)*dim]...)
	}
	return values, nil
}

// TextTokenIDs cuts or repeats ids to length k, as Hugging Face's TEXT init does: a text longer
// than k tokens keeps its first k, a shorter one is repeated ("a b" with k=5 gives "a b a b a").
func TextTokenIDs(ids []int, k int) []int {
	out := make([]int, k)
	for i := range out {
		out[i] = ids[i%len(ids)]
	}
	return out
}

// NumVirtualTokens returns k.
func (p *PromptTuning) NumVirtualTokens() int { return p.cfg.NumVirtualTokens }

// SupportsKVCache reports that Inputs and Outputs honour peft.Inputs.Cached, so peft/generate may
// decode with a key/value cache (its generate.CacheAware).
func (p *PromptTuning) SupportsKVCache() bool { return true }

// PromptEmbeddings returns the variable P [k, d] (nil before the method is applied to a model).
func (p *PromptTuning) PromptEmbeddings() *context.Variable { return p.prompt }

// Trainable implements peft.Method: P and the modules to save.
func (p *PromptTuning) Trainable(*context.Context) []peft.TrainableVariable {
	return peft.TrainAll(append([]*context.Variable{p.prompt}, p.modules...)...)
}

// State implements peft.Method: what Trainable lists.
func (p *PromptTuning) State(ctx *context.Context) []*context.Variable {
	return peft.VariablesOf(p.Trainable(ctx))
}

// Inputs implements peft.InputsHook: it prepends the k virtual tokens to every sequence, marks
// them as real in the mask and gives them positions 0…k−1, moving the real tokens up by k. A
// sequence too long to fit with the prompt panics (peft.Model.Call returns it as an error).
// Inputs continuing a cached sequence (in.Cached), whose cache already holds the virtual tokens,
// only move up by k.
func (p *PromptTuning) Inputs(ctx *context.Context, in *peft.Inputs) *peft.Inputs {
	k := p.cfg.NumVirtualTokens
	emb := in.Embeddings
	g := emb.Graph()
	batch, seq, dim := emb.Shape().Dim(0), emb.Shape().Dim(1), emb.Shape().Dim(2)
	if in.MaxLength > 0 && k+seq > in.MaxLength {
		panic(fmt.Sprintf("prompt_tuning: num_virtual_tokens %d plus the input length %d is %d, more than the model's maximum length %d",
			k, seq, k+seq, in.MaxLength))
	}
	if in.Cached {
		ctx.InAbsPath(context.RootScope).SetGraphParam(g, graphParamCached, true)
		out := *in
		out.Positions = graph.AddScalar(in.Positions, float64(k))
		return &out
	}
	prompt := p.prompt.ValueGraph(g)
	if prompt.DType() != emb.DType() {
		prompt = graph.ConvertDType(prompt, emb.DType())
	}
	prompt = graph.BroadcastToDims(graph.Reshape(prompt, 1, k, dim), batch, k, dim)
	out := &peft.Inputs{
		Embeddings: graph.Concatenate([]*graph.Node{prompt, emb}, 1),
		MaxLength:  in.MaxLength,
	}
	if in.Mask != nil {
		out.Mask = graph.Concatenate([]*graph.Node{graph.Ones(g, shapes.Make(in.Mask.DType(), batch, k)), in.Mask}, 1)
	}
	positions := in.Positions
	if positions == nil {
		positions = graph.Iota(g, shapes.Make(dtypes.Int32, batch, seq), 1)
	}
	virtual := graph.Iota(g, shapes.Make(positions.DType(), batch, k), 1)
	out.Positions = graph.Concatenate([]*graph.Node{virtual, graph.AddScalar(positions, k)}, 1)
	return out
}

// graphParamCached marks a graph whose inputs continue a cached sequence (Inputs saw
// peft.Inputs.Cached), so that Outputs has no virtual positions to drop.
const graphParamCached = "prompt_tuning_cached"

// Outputs implements peft.InputsHook: it drops the k virtual positions from the hidden states
// [batch, k+s, d], giving [batch, s, d]. It gathers the real rows of the flattened states (a
// Gather has a gradient on every backend; a Slice has none on the pure-Go one). The states of
// inputs continuing a cached sequence have no virtual positions and pass unchanged.
func (p *PromptTuning) Outputs(ctx *context.Context, hidden *graph.Node) *graph.Node {
	if cached, _ := ctx.InAbsPath(context.RootScope).GetGraphParam(hidden.Graph(), graphParamCached); cached == true {
		return hidden
	}
	k := p.cfg.NumVirtualTokens
	batch, total, dim := hidden.Shape().Dim(0), hidden.Shape().Dim(1), hidden.Shape().Dim(2)
	seq := total - k
	if seq < 0 {
		panic(fmt.Sprintf("prompt_tuning: hidden states %s are shorter than the %d virtual tokens", hidden.Shape(), k))
	}
	rows := make([]int32, 0, batch*seq)
	for b := range batch {
		for j := range seq {
			rows = append(rows, int32(b*total+k+j))
		}
	}
	indices := graph.Const(hidden.Graph(), tensors.FromFlatDataAndDimensions(rows, batch*seq, 1))
	flat := graph.Reshape(hidden, batch*total, dim)
	return graph.Reshape(graph.Gather(flat, indices, true), batch, seq, dim)
}
