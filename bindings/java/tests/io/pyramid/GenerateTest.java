package io.pyramid;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertTrue;

import java.util.ArrayList;
import java.util.List;
import org.junit.Test;

/** Streaming: the same greedy tokens and text as the C library, memory, parameters. */
public class GenerateTest extends WithModel {
    @Test
    public void greedyTokensMatchTheReferenceAndTheCli() throws Exception {
        StringBuilder text = new StringBuilder();
        int[] tokens;
        try (Session session = greedy(24)) {
            tokens = Reference.tokensOf(session.generateTokens(Reference.FIBONACCI), text);
        }
        assertArrayEquals(Reference.FIBONACCI_GREEDY_24, tokens);
        Reference.Cli cli = Reference.cli(Reference.FIBONACCI);
        assertArrayEquals(cli.tokens, tokens);
        assertEquals(cli.text, text.toString());
    }

    @Test
    public void prefillChunkIsAnEngineSetter() {
        // Chunks of 7 tokens: the same greedy tokens as one prefill (default policy: full).
        int[] tokens;
        try (Model chunked = new Model(null, p -> {
                 p.setDevice("cpu");
                 p.setPrefillChunk(7);
             });
             Session session = new Session(chunked, p -> {
                 p.setTemperature(0);
                 p.setMaxTokens(24);
             })) {
            tokens = Reference.tokensOf(session.generateTokens(Reference.FIBONACCI), new StringBuilder());
        }
        assertArrayEquals(Reference.FIBONACCI_GREEDY_24, tokens);
    }

    @Test
    public void iterableAndConsumerGiveTheSameText() {
        StringBuilder iterated = new StringBuilder();
        StringBuilder consumed = new StringBuilder();
        try (Session a = greedy(24); Session b = greedy(24)) {
            for (String piece : a.generate(Reference.FIBONACCI)) {
                assertFalse(piece.isEmpty());
                iterated.append(piece);
            }
            b.generate(Reference.FIBONACCI, consumed::append);
        }
        assertTrue(iterated.length() > 0);
        assertEquals(iterated.toString(), consumed.toString());
    }

    @Test
    public void memoryReportsEveryLayer() {
        try (Session session = greedy(8)) {
            assertEquals(0, session.memory().kvBytes());
            session.generate(Reference.FIBONACCI, piece -> {});
            Memory memory = session.memory();
            assertEquals(model.nLayers(), memory.layers().size());
            long sum = 0;
            for (Memory.Layer layer : memory.layers()) {
                assertTrue(layer.tokens() > 0);
                sum += layer.bytes();
            }
            assertEquals(memory.kvBytes(), sum);
            assertEquals(memory.kvBytesFull(), memory.kvBytes());
            assertEquals(1.0, memory.retention(), 0.0);
            assertEquals(session.nTokens(), memory.nTokens());
            assertEquals(memory.nTokens() - 1, memory.nProcessed()); // the last sampled is queued
        }
    }

    @Test
    public void paramsAreTheGeneratedStructSetters() {
        try (Session session = new Session(model, p -> {
            p.setKvPolicy("pyramid");
            p.setKvRetention(0.5f);
            p.setTemperature(0);
            p.setMaxTokens(4);
            assertEquals("pyramid", p.getKvPolicy());
            assertEquals(CapiConstants.PYR_SEED_RANDOM, p.getSeed());
        })) {
            session.generate("x = 1\n".repeat(40), piece -> {});
            assertEquals(0.5, session.kvParam("retention"), 1e-6);
            assertTrue(Double.isNaN(session.kvParam("no-such-knob")));
        }
    }

    @Test
    public void feedTokensContinuesLikeText() {
        int[] ids = model.tokenize(Reference.FIBONACCI, true);
        assertEquals(model.bosToken(), ids[0]);
        List<String> a = new ArrayList<>();
        List<String> b = new ArrayList<>();
        try (Session s1 = greedy(6); Session s2 = greedy(6)) {
            s1.feedTokens(ids);
            s1.generate(null, a::add);
            s2.generate(Reference.FIBONACCI, b::add);
        }
        assertEquals(b, a);
    }
}
