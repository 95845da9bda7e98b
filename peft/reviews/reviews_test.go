package reviews_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/peft/reviews"
)

func TestGenerateIsDeterministicAndBalanced(t *testing.T) {
	a, b := reviews.Generate(400, 1), reviews.Generate(400, 1)
	require.Equal(t, a, b)
	require.NotEqual(t, a, reviews.Generate(400, 2))
	positive := 0
	for _, r := range a {
		if r.Positive {
			positive++
		}
		require.LessOrEqual(t, len(strings.Fields(r.Text)), reviews.MaxWords, r.Text)
	}
	require.InDelta(t, 200, positive, 40)
}

func TestNegationFlipsTheLabel(t *testing.T) {
	for _, r := range reviews.Generate(500, 3) {
		words := strings.Fields(r.Text)
		if len(words) == 5 && words[3] == "not" {
			goodWord := strings.Contains(" great excellent amazing fantastic perfect solid good wonderful ", " "+words[4]+" ")
			require.Equal(t, !goodWord, r.Positive, r.Text)
		}
	}
}

func TestTokenizerRoundTrip(t *testing.T) {
	tok := reviews.NewTokenizer()
	ids, mask := tok.Encode("the battery life is terrible", 8)
	require.Equal(t, []int32{1, 1, 1, 1, 1, 1, 0, 0}, mask)
	require.Equal(t, int32(reviews.BosID), ids[0])
	require.Equal(t, "the battery life is terrible", tok.Decode(ids))
	ids, _ = tok.Encode("the zeppelin is great", 6)
	require.Equal(t, int32(reviews.UnkID), ids[2])
	for _, r := range reviews.Generate(200, 4) {
		ids, _ := tok.Encode(r.Text, reviews.MaxWords+1)
		require.Equal(t, r.Text, tok.Decode(ids))
	}
}

func TestBatches(t *testing.T) {
	tok := reviews.NewTokenizer()
	data := reviews.Generate(10, 5)
	batches, err := reviews.Batches(tok, data, 4, 7)
	require.NoError(t, err)
	require.Len(t, batches, 2)
	require.Equal(t, []int{4, 7}, batches[0].Inputs[0].Shape().Dimensions)
	require.Equal(t, []int{4, 1}, batches[0].Labels[0].Shape().Dimensions)
	require.Equal(t, data[5].Label(), batches[1].Labels[0].Value().([][]int32)[1][0])
	_, err = reviews.Batches(tok, data[:2], 4, 7)
	require.ErrorContains(t, err, "do not fill one batch")
}
