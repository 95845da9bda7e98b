package experiment

import (
	"fmt"
	"io/fs"
	"peft/peft/files"
	"strings"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft"
	"peft/peft/llama"
	"peft/peft/reviews"
	"peft/peft/stories260k"
	"peft/peft/tokenizer"
)

// Pretrained is a pretrained Llama checkpoint held in memory once (its configuration, tokenizer
// and weights), from which each run takes a fresh copy of the weights, so that no run sees
// another's training.
type Pretrained struct {
	// Backend runs every model built from it.
	Backend   backends.Backend
	Name      string
	Config    llama.Config
	Tokenizer *tokenizer.Tokenizer
	weights   *context.Context
}

// LoadStories260K loads the embedded stories260K model (package stories260k) to run on backend.
func LoadStories260K(backend backends.Backend) (*Pretrained, error) {
	return LoadPretrainedFS(backend, stories260k.FS(), stories260k.Name)
}

// LoadPretrainedFS loads a Hugging Face Llama folder that has a tokenizer.json; name is how
// messages refer to it.
func LoadPretrainedFS(backend backends.Backend, fsys fs.FS, name string) (*Pretrained, error) {
	data, err := files.Read(fsys, "tokenizer.json", files.MaxTokenizer)
	if err != nil {
		return nil, fmt.Errorf("experiment: model %s: %w", name, err)
	}
	tok, err := tokenizer.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("experiment: model %s: %w", name, err)
	}
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, fsys)
	if err != nil {
		return nil, fmt.Errorf("experiment: model %s: %w", name, err)
	}
	return &Pretrained{Backend: backend, Name: name, Config: cfg, Tokenizer: tok, weights: ctx}, nil
}

// NewContext returns a new context holding a copy of the pretrained weights: training a model
// built on it leaves the pretrained weights, and every other copy, untouched.
func (p *Pretrained) NewContext() (*context.Context, error) {
	ctx := context.New()
	for v := range p.weights.IterVariables() {
		value, err := v.Value()
		if err != nil {
			return nil, err
		}
		clone, err := value.LocalClone()
		if err != nil {
			return nil, err
		}
		ctx.InAbsPath(v.Scope()).VariableWithValue(v.Name(), clone)
	}
	peft.SetBaseModel(ctx, peft.BaseModelOf(p.weights)) // saved adapters name the same base
	return ctx, nil
}

// NewRandomContext returns a new context for the same architecture with every weight drawn
// from seed instead (llama.Init; numLabels as there: 0 for a language model, > 0 for a
// classifier): the "no pretraining" baseline.
func (p *Pretrained) NewRandomContext(numLabels int, seed uint64) (*context.Context, error) {
	ctx := context.New()
	if err := llama.Init(ctx, p.Config, numLabels, seed); err != nil {
		return nil, err
	}
	return ctx, nil
}

// LMBatches tokenizes texts with tok (each as <s> text </s>), concatenates them into one stream
// and cuts it into rows of seqLen tokens, batch rows per batch, for next-token training: inputs
// are ids and mask [batch, seqLen] int32 (the mask is all ones: packed rows have no padding),
// labels the same two tensors, as peft.NextTokenLoss expects. Tokens that do not fill a last
// batch are dropped; it is an error if the texts do not fill one batch.
func LMBatches(tok *tokenizer.Tokenizer, texts []string, batch, seqLen int) ([]peft.Batch, error) {
	if batch <= 0 || seqLen <= 0 {
		return nil, fmt.Errorf("experiment.LMBatches: batch (%d) and seqLen (%d) must be > 0", batch, seqLen)
	}
	var stream []int32
	for _, text := range texts {
		for _, id := range tok.Encode(text) {
			stream = append(stream, int32(id))
		}
		if eos := tok.EOS(); eos >= 0 {
			stream = append(stream, int32(eos))
		}
	}
	per := batch * seqLen
	if len(stream) < per {
		return nil, fmt.Errorf("experiment.LMBatches: %d tokens do not fill one batch of %d×%d", len(stream), batch, seqLen)
	}
	mask := make([]int32, per)
	for i := range mask {
		mask[i] = 1
	}
	var out []peft.Batch
	for start := 0; start+per <= len(stream); start += per {
		ids := tensors.FromFlatDataAndDimensions(append([]int32(nil), stream[start:start+per]...), batch, seqLen)
		m := tensors.FromFlatDataAndDimensions(append([]int32(nil), mask...), batch, seqLen)
		inputs := []*tensors.Tensor{ids, m}
		out = append(out, peft.Batch{Inputs: inputs, Labels: inputs})
	}
	return out, nil
}

// ReviewBatches turns sentiment reviews into classifier batches with a subword tokenizer (such
// as a pretrained model's): each review is tok.Encode(text) (<s> first), right-padded with id 0
// to seqLen; inputs are ids and mask [batch, seqLen] int32 (mask 1 for real tokens), labels
// [batch, 1] int32. A last partial batch is dropped. A review longer than seqLen tokens is an
// error (so no review is silently cut); MaxReviewTokens gives the seqLen that fits them all.
func ReviewBatches(tok *tokenizer.Tokenizer, data []reviews.Review, batch, seqLen int) ([]peft.Batch, error) {
	if batch <= 0 || seqLen <= 0 {
		return nil, fmt.Errorf("experiment.ReviewBatches: batch (%d) and seqLen (%d) must be > 0", batch, seqLen)
	}
	if len(data) < batch {
		return nil, fmt.Errorf("experiment.ReviewBatches: %d reviews do not fill one batch of %d", len(data), batch)
	}
	var out []peft.Batch
	for start := 0; start+batch <= len(data); start += batch {
		ids := make([]int32, batch*seqLen)
		mask := make([]int32, batch*seqLen)
		labels := make([]int32, batch)
		for i, r := range data[start : start+batch] {
			enc := tok.Encode(r.Text)
			if len(enc) > seqLen {
				return nil, fmt.Errorf("experiment.ReviewBatches: review %q is %d tokens, longer than seqLen %d", r.Text, len(enc), seqLen)
			}
			for j, id := range enc {
				ids[i*seqLen+j] = int32(id)
				mask[i*seqLen+j] = 1
			}
			labels[i] = r.Label()
		}
		out = append(out, peft.Batch{
			Inputs: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(ids, batch, seqLen), tensors.FromFlatDataAndDimensions(mask, batch, seqLen)},
			Labels: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(labels, batch, 1)},
		})
	}
	return out, nil
}

// MaxReviewTokens is the length in tokens (with <s>) of the longest review under tok.
func MaxReviewTokens(tok *tokenizer.Tokenizer, data []reviews.Review) int {
	longest := 0
	for _, r := range data {
		longest = max(longest, len(tok.Encode(r.Text)))
	}
	return longest
}

// Zorblat vocabulary: invented words TinyStories never contains.
var (
	zCreatures = []string{"zorblat", "snerfling", "quibbit", "wumple", "glorpox", "fizzwick"}
	zNames     = []string{"Quix", "Bopo", "Zindle", "Murf", "Tazzle", "Plink", "Orbo", "Yeeb"}
	zPlaces    = []string{"the glimmerwood", "the Fizzle Marsh", "Mount Plonk", "the wobbly dunes", "Snorf Valley"}
	zVerbs     = [][2]string{{"flonk", "flonked"}, {"zib", "zibbed"}, {"wobble", "wobbled"}, {"snozzle", "snozzled"}, {"glimp", "glimped"}}
	zObjects   = []string{"grumbleberry", "moonpebble", "snozzcake", "twinklenut", "blorpkin"}
	zAdjs      = []string{"sparkly", "squishy", "blorpy", "zany", "fizzy"}
	zTimes     = []string{"morning", "evening", "moonrise"}
	zGreetings = []string{"Blorp blorp", "Zib zab", "Frooble"}
)

// ZorblatStories returns n short stories in a style the TinyStories models never saw: a fixed
// template over invented creatures, names, places, verbs and things ("Once upon a time, a
// zorblat named Quix lived in the glimmerwood. Every moonrise, Quix would flonk the fizzy
// grumbleberry. …"), drawn deterministically from seed. A model that learned the style predicts
// the template exactly and only has the slot choices left to guess; text from another seed is a
// held-out set of the same style.
func ZorblatStories(n int, seed uint64) []string {
	rng := peft.NewRand(seed)
	pick := func(words []string) string { return words[rng.IntN(len(words))] }
	out := make([]string, n)
	for i := range out {
		name, friend := pick(zNames), pick(zNames)
		for friend == name {
			friend = pick(zNames)
		}
		place, object, verb := pick(zPlaces), pick(zObjects), zVerbs[rng.IntN(len(zVerbs))]
		var b strings.Builder
		fmt.Fprintf(&b, "Once upon a time, a %s named %s lived in %s. ", pick(zCreatures), name, place)
		fmt.Fprintf(&b, "Every %s, %s would %s the %s %s. ", pick(zTimes), name, verb[0], pick(zAdjs), object)
		fmt.Fprintf(&b, "One day, %s met a %s called %s. ", name, pick(zCreatures), friend)
		fmt.Fprintf(&b, "\"%s, %s!\" said %s. \"Shall we %s the %s together?\" ", pick(zGreetings), friend, name, verb[0], object)
		fmt.Fprintf(&b, "So %s and %s %s all day, and %s was %s forever.", name, friend, verb[1], place, pick(zAdjs))
		out[i] = b.String()
	}
	return out
}
