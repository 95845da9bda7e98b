// Package generate continues token sequences with a causal language model built with peft (such
// as llama.CausalLM, with or without a fine-tuning method applied): greedy decoding, or sampling
// with temperature, top-k and top-p (nucleus) filtering from a seeded random source.
//
// # Fixed shapes
//
// GoMLX compiles a new graph for every distinct input shape, so Generate never grows its input one
// token at a time. It keeps a fixed-length buffer of L token ids, L = len(prompt) + MaxNewTokens
// rounded up to a multiple of 16 (and capped at the maximum length, see Config.MaxLength). Without
// the key/value cache (below) it runs the model on the whole buffer at every step, with a mask
// [1, L] that is 1 for the real tokens and 0 for the padding (id 0) after them. The model's causal
// attention keeps the padding after position t from changing the logits at t, so each step reads
// the logits at the last real position and writes the chosen id into the buffer: the whole
// generation runs one compiled graph (the tests check that the ids are those of running the model
// on the exact, unpadded sequence at every step).
//
// # Cost and the key/value cache
//
// Without a cache every step recomputes the whole buffer: MaxNewTokens forward passes over L
// positions (attention O(MaxNewTokens·L²)). So Generate decodes with a key/value cache where the
// model allows it: one pass over the prompt (llama.CausalLMPrefill, on the prompt padded to a
// multiple of 16), then one position per new token (llama.CausalLMStep), each attending over a
// cache of L positions. A generation runs two compiled graphs, the prefill's (one per prompt
// length rounded to 16 and buffer length) and the step's (one per buffer length), each built
// once and kept by the model (peft.Model.CallFn, which runs them with the method active as Call
// does). The ids are those of the cache-free path: the tests check greedy decoding id for id,
// sampling with a seed, and every step's logits within 1e-5 of the full forward's (relative to
// the largest logit where it is over 1). In one run of BenchmarkGenerate (pure-Go backend, two
// cores) the cache made 64 new tokens on stories260K 3.0× faster (825 against 279 tokens/s) and
// 128 on a random 4-layer Llama of width 256 4.7× faster (379 against 81 tokens/s).
//
// The cache is used when the model is a causal language model of the Llama family
// (llama.CausalLM): its base model record (peft.BaseModelOf, written by llama.Init and
// llama.LoadPretrained) holds a Llama-family config.json that agrees with the model's traced
// layout (vocabulary, width, layers, heads, maximum length). Every method whose hooks act per
// token works with the cache unchanged (LoRA, DoRA, QLoRA, AdaLoRA, IA³, adapters, full
// fine-tuning, merged or not); a method that changes the inputs or the attention positions
// (peft.InputsHook, peft.AttentionHook) must say it honours peft.Inputs.Cached (CacheAware):
// prompt and prefix tuning do. Any other model or method runs the cache-free path, as does
// Config.NoCache. A model function that computes something other than llama.CausalLM over the
// same variables (a wrapper changing its logits, say) looks the same from outside: set NoCache
// for it. The cached logits differ from the cache-free path's only by float32 rounding, so two
// logits closer than that could, rarely, be picked differently; NoCache reproduces the
// cache-free path exactly.
//
// # Batches
//
// GenerateBatch runs several prompts in one batch, each row with its own Config (MaxNewTokens,
// sampling and Seed, StopIDs, OnToken), and gives each row the ids Generate gives it alone. With
// the cache it left-pads the prompts to the longest (then pads them all after it to a multiple of
// 16 for the prefill) and passes each row's padding to llama.CausalLMPrefill and CausalLMStep, so
// that each row's positions start at 0 at its first real token and its padding is masked out of
// attention and never cached: each row's cache is the one it has alone, prompt tuning's virtual
// tokens and prefix tuning's prefix before each row's own tokens. Each row samples from its own
// random source (its Seed) and ends on its own; a row that has ended stays in the batch (its
// logits unread) until the last one ends. The cache has room for the longest prompt plus
// MaxNewTokens of any row, so the attention of a row sums over more (masked, zero-weight)
// entries than alone: its logits agree with Generate's within float32 rounding (the tests check
// the ids, greedy and sampled, for the base model, LoRA, prompt and prefix tuning). Rows that
// cannot take the cache (Config.NoCache, a model or method the cache does not fit) run one after
// another with Generate. In one run of BenchmarkGenerateBatch (pure-Go backend, two cores) a
// batch of 8 prompts made 32 new tokens each 6.6× faster than 8 Generate calls (4035 against 613
// tokens/s on stories260K).
//
// # Determinism
//
// Greedy decoding (Temperature 0, the default) takes the highest logit, the lowest id among
// ties. Sampling draws from a random source seeded with Config.Seed (peft.NewRand), one draw per
// new token, so the same model, prompt, configuration and backend give the same ids. (Two
// backends may differ in the last bits of the logits and so, rarely, in a pick.)
//
// # Stop ids
//
// Generation stops right after emitting one of Config.StopIDs (an end-of-sequence id, say), and
// that id is included in the result (and given to Config.OnToken), as Hugging Face's generate
// includes the EOS token in the generated ids.
//
// # Prompt tuning
//
// Prompt tuning prepends its virtual tokens inside the model, so the model sees k more positions
// than the buffer holds. When Config.MaxLength is 0, Generate learns the model's maximum length
// from its layout and subtracts the virtual tokens of a method that reports them (a method with
// a NumVirtualTokens() int method, as prompttuning.PromptTuning has). An explicit MaxLength is
// used as given: it must leave room for the virtual tokens, or else the model's own length check
// fails and Generate returns that error.
package generate

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/llama"
)

// bufferMultiple is what the buffer length is rounded up to.
const bufferMultiple = 16

// Config configures a generation. MaxNewTokens is required; every other field's zero value is a
// default (greedy decoding, no filtering, no stop ids, the model's own maximum length).
type Config struct {
	// MaxNewTokens is the most ids to generate. Must be > 0.
	MaxNewTokens int
	// Temperature divides the logits before sampling. 0 (default) decodes greedily; > 0 samples
	// (any positive value is valid: a tiny one samples like greedy decoding). Must be finite.
	Temperature float64
	// TopK, when > 0, samples only among the TopK highest logits (ties broken toward the lower id,
	// so exactly min(TopK, vocab) ids remain). 0 (default) turns it off. Ignored when greedy.
	TopK int
	// TopP, in (0, 1), samples only among the smallest set of highest-probability ids whose
	// probabilities (after temperature and top-k) sum to at least TopP; at least one id always
	// remains. 0 (default) or 1 turns it off. Ignored when greedy.
	TopP float64
	// Seed seeds the random source of sampling. Unused when greedy.
	Seed uint64
	// StopIDs end the generation right after one of them is generated; the stop id is included in
	// the result. Each must be ≥ 0 and below the vocabulary size.
	StopIDs []int
	// MaxLength is the longest token-id sequence the model accepts: prompt plus new ids must fit,
	// and the padded buffer is never longer. 0 (default) learns it from the model (its layout's
	// maximum length less the virtual tokens of prompt tuning; no limit if the model has none).
	// Must be ≥ 0.
	MaxLength int
	// NoCache turns the key/value cache off: every step runs the model on the whole buffer, as
	// Call does (see the package documentation). Default false: the cache is used where the
	// model allows it. The ids are the same either way.
	NoCache bool
	// OnToken, when set, is called with each new id (a stop id too) as soon as it is chosen,
	// before the next is computed: for streaming it as it comes. Returning false ends the generation there (the id
	// is kept, as a stop id is), as a client that went away or a stop string found does.
	OnToken func(id int) bool
}

// Validate checks the configuration on its own, naming the first field that is wrong. What needs
// the model (vocabulary, maximum length) is checked by Generate.
func (c Config) Validate() error {
	if c.MaxNewTokens <= 0 {
		return fmt.Errorf("generate: MaxNewTokens must be > 0, got %d", c.MaxNewTokens)
	}
	if !(c.Temperature >= 0) || math.IsInf(c.Temperature, 0) {
		return fmt.Errorf("generate: Temperature must be ≥ 0 and finite (0: greedy), got %g", c.Temperature)
	}
	if c.TopK < 0 {
		return fmt.Errorf("generate: TopK must be ≥ 0 (0: off), got %d", c.TopK)
	}
	if !(c.TopP >= 0 && c.TopP <= 1) {
		return fmt.Errorf("generate: TopP must be in [0, 1] (0 or 1: off), got %g", c.TopP)
	}
	if c.MaxLength < 0 {
		return fmt.Errorf("generate: MaxLength must be ≥ 0 (0: the model's), got %d", c.MaxLength)
	}
	for _, id := range c.StopIDs {
		if id < 0 {
			return fmt.Errorf("generate: StopIDs: id %d is negative", id)
		}
	}
	return nil
}

// virtualTokens is implemented by methods that add positions inside the model (prompt and prefix
// tuning).
type virtualTokens interface {
	NumVirtualTokens() int
}

// CacheAware is implemented by methods that change the model's inputs or attention positions
// (peft.InputsHook, peft.AttentionHook) and honour peft.Inputs.Cached, so that Generate may decode
// them with a key/value cache: prompttuning.PromptTuning and prefixtuning.PrefixTuning. Such a
// method without it runs the cache-free path.
type CacheAware interface {
	// SupportsKVCache reports whether the method's hooks work with cached decoding.
	SupportsKVCache() bool
}

// cachedConfig returns the Llama-family configuration to decode m with a key/value cache, or
// false when m is not llama.CausalLM of the configuration its base model record holds or its
// method cannot run with a cache (see the package documentation).
func cachedConfig(m *peft.Model) (llama.Config, bool) {
	method := m.Method()
	_, inputs := method.(peft.InputsHook)
	_, attention := method.(peft.AttentionHook)
	if aware, ok := method.(CacheAware); (inputs || attention) && !(ok && aware.SupportsKVCache()) {
		return llama.Config{}, false
	}
	raw := peft.BaseModelOf(m.Context()).Config
	layout := m.Layout()
	if raw == nil || layout == nil || layout.Task != peft.TaskCausalLM || len(layout.Outputs) != 1 || len(layout.Embeddings) != 1 {
		return llama.Config{}, false
	}
	cfg, err := llama.ParseConfig(raw)
	if err != nil {
		return llama.Config{}, false
	}
	out, embed := layout.Outputs[0], layout.Embeddings[0]
	if out.Rank() != 3 || out.Dim(2) != cfg.VocabSize || embed.Vocab != cfg.VocabSize || embed.Dim != cfg.HiddenSize ||
		layout.MaxLength != cfg.MaxPositions || layout.NumLayers != cfg.NumLayers || len(layout.Attentions) != cfg.NumLayers {
		return llama.Config{}, false
	}
	for _, site := range layout.Attentions {
		if site.KVHeads != cfg.NumKVHeads || site.HeadDim != cfg.HeadDim() {
			return llama.Config{}, false
		}
	}
	return cfg, true
}

// MaxLength returns the longest id sequence (prompt plus new ids) Generate runs m on with cfg:
// cfg.MaxLength, or else the model's maximum length less the virtual tokens its method adds
// (prompt or prefix tuning); 0 for no limit. Servers check requests against it before queueing
// them.
func MaxLength(m *peft.Model, cfg Config) int {
	if cfg.MaxLength > 0 {
		return cfg.MaxLength
	}
	layout := m.Layout()
	if layout == nil || layout.MaxLength <= 0 {
		return 0
	}
	limit := layout.MaxLength
	if v, ok := m.Method().(virtualTokens); ok {
		limit -= v.NumVirtualTokens()
	}
	return max(limit, 1)
}

// bufferLength is the length of the buffer for total ids: total rounded up to a multiple of
// bufferMultiple, at most limit (if > 0; total ≤ limit).
func bufferLength(total, limit int) int {
	length := (total + bufferMultiple - 1) / bufferMultiple * bufferMultiple
	if limit > 0 && length > limit {
		length = limit
	}
	return length
}

// inputVocab returns the size of the model's token-embedding table when the layout shows exactly
// one, else 0 (unknown).
func inputVocab(m *peft.Model) int {
	if layout := m.Layout(); layout != nil && len(layout.Embeddings) == 1 {
		return layout.Embeddings[0].Vocab
	}
	return 0
}

// Generate continues prompt (token ids, a BOS id included if the model expects one) with the
// causal language model m, whose first output must be the logits [batch, seq, vocab] of inputs
// (ids [batch, seq] int32, mask [batch, seq] int32). It returns only the new ids: MaxNewTokens of
// them, or fewer when a stop id (included) ends the generation. See the package documentation
// for how it runs.
//
// Errors (never panics): an invalid cfg, an empty prompt, ids outside the vocabulary, a prompt
// plus MaxNewTokens longer than the maximum length, a model whose first output is not logits
// [1, L, vocab], non-finite logits, or any error of the model's own Call.
func Generate(m *peft.Model, prompt []int, cfg Config) ([]int, error) {
	if m == nil {
		return nil, fmt.Errorf("generate: nil model")
	}
	r, err := newRow(m, prompt, cfg)
	if err != nil {
		return nil, err
	}
	if llamaCfg, ok := cachedConfig(m); ok && !cfg.NoCache {
		if generateCached(m.CallFn, llamaCfg, []*row{r}, r.length); r.err != nil {
			return nil, r.err
		}
		return r.generated, nil
	}
	n, length := len(prompt), r.length
	ids := make([]int32, length)
	mask := make([]int32, length)
	for i, id := range prompt {
		ids[i] = int32(id)
		mask[i] = 1
	}
	var logits []float32
	for step := 0; ; step++ {
		logits, err = logitsAt(m, ids, mask, n+step-1, logits)
		if err != nil {
			return nil, err
		}
		next, more, err := r.choose(step, logits)
		if err != nil {
			return nil, err
		}
		if !more {
			return r.generated, nil
		}
		ids[n+step] = int32(next)
		mask[n+step] = 1
	}
}

// row is one sequence's generation: its checked prompt and configuration, its sampler, the ids
// chosen so far and how it ended.
type row struct {
	prompt     []int
	cfg        Config
	length     int // its buffer length when generated alone: prompt plus MaxNewTokens, rounded
	embedVocab int // the input vocabulary (0: unknown)
	stop       map[int]bool
	sampler    *sampler // nil: greedy
	generated  []int
	done       bool  // ended: MaxNewTokens, a stop id, OnToken or an error
	err        error // why it failed, if it did
}

// newRow checks prompt and cfg against m (see Generate's errors) and prepares their generation.
func newRow(m *peft.Model, prompt []int, cfg Config) (*row, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	n := len(prompt)
	if n == 0 {
		return nil, fmt.Errorf("generate: empty prompt (give at least one token id, such as BOS)")
	}
	embedVocab := inputVocab(m)
	for i, id := range prompt {
		if id < 0 || id > math.MaxInt32 {
			return nil, fmt.Errorf("generate: prompt[%d] = %d is not a token id", i, id)
		}
		if embedVocab > 0 && id >= embedVocab {
			return nil, fmt.Errorf("generate: prompt[%d] = %d is outside the vocabulary [0, %d)", i, id, embedVocab)
		}
	}
	if embedVocab > 0 {
		for _, id := range cfg.StopIDs {
			if id >= embedVocab {
				return nil, fmt.Errorf("generate: stop id %d is outside the vocabulary [0, %d)", id, embedVocab)
			}
		}
	}
	limit := MaxLength(m, cfg)
	total := n + cfg.MaxNewTokens
	if limit > 0 && total > limit {
		why := ""
		if v, ok := m.Method().(virtualTokens); ok && cfg.MaxLength <= 0 {
			why = fmt.Sprintf(" (the model's %d positions less the %d virtual tokens of %s)", m.Layout().MaxLength, v.NumVirtualTokens(), m.Method().Name())
		}
		return nil, fmt.Errorf("generate: the prompt (%d ids) plus MaxNewTokens (%d) is %d, more than the maximum length %d%s",
			n, cfg.MaxNewTokens, total, limit, why)
	}
	r := &row{prompt: prompt, cfg: cfg, length: bufferLength(total, limit), embedVocab: embedVocab,
		stop: map[int]bool{}, generated: make([]int, 0, cfg.MaxNewTokens)}
	for _, id := range cfg.StopIDs {
		r.stop[id] = true
	}
	if cfg.Temperature > 0 {
		r.sampler = newSampler(cfg.Temperature, cfg.TopK, cfg.TopP, peft.NewRand(cfg.Seed))
	}
	return r, nil
}

// choose picks the id of new token step from logits, the model's at the row's last token, and
// appends it; more is false when that ends the row (MaxNewTokens, a stop id, OnToken returning
// false).
func (r *row) choose(step int, logits []float32) (next int, more bool, err error) {
	vocab := len(logits)
	if step == 0 {
		for i, id := range r.prompt {
			if id >= vocab {
				return 0, false, fmt.Errorf("generate: prompt[%d] = %d is outside the vocabulary [0, %d)", i, id, vocab)
			}
		}
		for _, id := range r.cfg.StopIDs {
			if id >= vocab {
				return 0, false, fmt.Errorf("generate: stop id %d is outside the vocabulary [0, %d)", id, vocab)
			}
		}
	}
	if err := checkLogits(logits); err != nil {
		return 0, false, fmt.Errorf("generate: logits at position %d (new token %d): %w", len(r.prompt)+step-1, step, err)
	}
	if r.sampler == nil {
		next = argmax(logits)
	} else {
		next = r.sampler.sample(logits)
	}
	if r.embedVocab > 0 && next >= r.embedVocab {
		return 0, false, fmt.Errorf("generate: generated id %d is outside the input vocabulary [0, %d)", next, r.embedVocab)
	}
	r.generated = append(r.generated, next)
	more = r.cfg.OnToken == nil || r.cfg.OnToken(next) // every id, a stop id too
	return next, more && !r.stop[next] && len(r.generated) < r.cfg.MaxNewTokens, nil
}

// logitsAt runs m on the buffer and copies the logits at position pos into row (reused when it
// has the right length).
func logitsAt(m *peft.Model, ids, mask []int32, pos int, row []float32) ([]float32, error) {
	length := len(ids)
	outputs, err := m.Call(tensors.FromFlatDataAndDimensions(ids, 1, length), tensors.FromFlatDataAndDimensions(mask, 1, length))
	if err != nil {
		return nil, fmt.Errorf("generate: running the model on [1, %d] ids: %w", length, err)
	}
	defer finalize(outputs)
	if len(outputs) == 0 {
		return nil, fmt.Errorf("generate: the model returned no outputs")
	}
	return readRow(outputs[0], 1, length, 0, pos, row)
}

// finalize frees the tensors' memory (nil ones are skipped).
func finalize(ts []*tensors.Tensor) {
	for _, t := range ts {
		if t != nil {
			_ = t.FinalizeAll()
		}
	}
}

// readRow copies the logits of batch row b at position pos of logits [batch, length, vocab] into
// row (reused when it has the right length).
func readRow(logits *tensors.Tensor, batch, length, b, pos int, row []float32) ([]float32, error) {
	shape := logits.Shape()
	if shape.Rank() != 3 || shape.Dim(0) != batch || shape.Dim(1) != length || shape.Dim(2) <= 0 {
		return nil, fmt.Errorf("generate: the model's first output is %s; want logits [batch=%d, seq=%d, vocab] (a causal language model)",
			shape, batch, length)
	}
	vocab := shape.Dim(2)
	if len(row) != vocab {
		row = make([]float32, vocab)
	}
	offset := (b*length + pos) * vocab
	var err error
	switch logits.DType() {
	case dtypes.Float32:
		err = tensors.ConstFlatData(logits, func(flat []float32) { copy(row, flat[offset:offset+vocab]) })
	case dtypes.Float64:
		err = tensors.ConstFlatData(logits, func(flat []float64) {
			for i, v := range flat[offset : offset+vocab] {
				row[i] = float32(v)
			}
		})
	default:
		return nil, fmt.Errorf("generate: logits of dtype %s are not supported (want float32 or float64)", logits.DType())
	}
	if err != nil {
		return nil, fmt.Errorf("generate: reading the logits: %w", err)
	}
	return row, nil
}

// checkLogits rejects NaN and +Inf (which make every pick meaningless) and rows with no finite
// value; -Inf marks an id that can never be picked.
func checkLogits(row []float32) error {
	finite := false
	for i, v := range row {
		switch {
		case math.IsNaN(float64(v)) || math.IsInf(float64(v), 1):
			return fmt.Errorf("id %d has logit %g", i, v)
		case !math.IsInf(float64(v), -1):
			finite = true
		}
	}
	if !finite {
		return fmt.Errorf("every logit is -Inf")
	}
	return nil
}

// argmax returns the index of the largest value, the lowest index among ties.
func argmax(row []float32) int {
	best := 0
	for i, v := range row {
		if v > row[best] {
			best = i
		}
	}
	return best
}

// sampler draws ids from logits with temperature, top-k and top-p, reusing its buffers.
type sampler struct {
	temperature float64
	topK        int
	topP        float64
	rng         *rand.Rand
	probs       []float64
	order       []int
}

func newSampler(temperature float64, topK int, topP float64, rng *rand.Rand) *sampler {
	return &sampler{temperature: temperature, topK: topK, topP: topP, rng: rng}
}

// sample draws one id from distribution(row), with one draw of the random source.
func (s *sampler) sample(row []float32) int {
	probs := s.distribution(row)
	u := s.rng.Float64()
	cum, last := 0.0, -1
	for i, p := range probs {
		if p == 0 {
			continue
		}
		cum += p
		last = i
		if u < cum {
			return i
		}
	}
	return last // u within rounding of 1
}

// distribution returns the probabilities sample draws from (normalized, 0 for filtered ids):
// softmax(row/temperature), then only the topK highest ids (ties toward the lower id), then only
// the smallest prefix, in that order, whose renormalized probabilities sum to ≥ topP (at least
// one id), renormalized again. The returned slice is the sampler's buffer.
func (s *sampler) distribution(row []float32) []float64 {
	vocab := len(row)
	if cap(s.probs) < vocab {
		s.probs = make([]float64, vocab)
	}
	probs := s.probs[:vocab]
	best := float64(row[argmax(row)])
	total := 0.0
	for i, v := range row {
		// (v - best) ≤ 0, so exp never overflows; a tiny temperature sends all but the best to 0.
		probs[i] = math.Exp((float64(v) - best) / s.temperature)
		total += probs[i]
	}
	topK := s.topK > 0 && s.topK < vocab
	topP := s.topP > 0 && s.topP < 1
	if topK || topP {
		if cap(s.order) < vocab {
			s.order = make([]int, vocab)
		}
		order := s.order[:vocab]
		for i := range order {
			order[i] = i
		}
		// Highest logit first, lower id first among ties (a stable sort of ids in order).
		slices.SortStableFunc(order, func(a, b int) int {
			switch {
			case row[a] > row[b]:
				return -1
			case row[a] < row[b]:
				return 1
			}
			return 0
		})
		keep := vocab
		if topK {
			keep = s.topK
			total = 0
			for _, i := range order[:keep] {
				total += probs[i]
			}
		}
		if topP {
			cum, cut := 0.0, keep // rounding may leave cum just below topP·total: keep them all
			for j, i := range order[:keep] {
				cum += probs[i]
				if cum >= s.topP*total {
					cut = j + 1
					break
				}
			}
			keep = cut
		}
		for _, i := range order[keep:] {
			probs[i] = 0
		}
		total = 0
		for _, i := range order[:keep] {
			total += probs[i]
		}
	}
	for i := range probs {
		probs[i] /= total
	}
	return probs
}

// MeanNLL scores a token sequence with m under teacher forcing: the mean over t of
// −log p(ids[t+1] | ids[:t+1]) in natural log, computed in float64 from the model's logits. A
// sequence of fewer than two tokens has nothing to score and gives 0.
func MeanNLL(m *peft.Model, ids []int) (float64, error) {
	if m == nil {
		return 0, errors.New("generate.MeanNLL: nil model")
	}
	if len(ids) < 2 {
		return 0, nil
	}
	input := make([]int32, len(ids))
	for i, id := range ids {
		input[i] = int32(id)
	}
	out, err := m.Call(tensors.FromFlatDataAndDimensions(input, 1, len(ids)))
	if err != nil {
		return 0, fmt.Errorf("generate.MeanNLL: %w", err)
	}
	logits, ok := out[0].Value().([][][]float32)
	if !ok || len(logits) != 1 || len(logits[0]) != len(ids) {
		return 0, fmt.Errorf("generate.MeanNLL: the model's output %s is not [1, %d, vocab] float32 logits", out[0].Shape(), len(ids))
	}
	var sum float64
	for t := 0; t+1 < len(ids); t++ {
		row := logits[0][t]
		if ids[t+1] < 0 || ids[t+1] >= len(row) {
			return 0, fmt.Errorf("generate.MeanNLL: id %d at position %d is outside the vocabulary of %d", ids[t+1], t+1, len(row))
		}
		maxLogit := math.Inf(-1)
		for _, v := range row {
			maxLogit = math.Max(maxLogit, float64(v))
		}
		var z float64
		for _, v := range row {
			z += math.Exp(float64(v) - maxLogit)
		}
		sum += maxLogit + math.Log(z) - float64(row[ids[t+1]])
	}
	return sum / float64(len(ids)-1), nil
}
